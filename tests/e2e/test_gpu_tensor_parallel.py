"""On two GPUs: a TP=2 replica (NCCL) agrees with a TP=1 replica on a ~1B Llama (random
weights saved as an HF checkpoint, bf16), through the whole cluster path.

TP=1 generates 8 x 128 greedy tokens; TP=2 then predicts every next token teacher-forced (one
request per prefix, max_tokens=1), and must agree on at least 99% of them: the all-reduce sums
bf16 partial products in another order, so exact free-running equality is not expected.
"""

import pytest
import torch

from cluster.client import Client
from cluster.config import Config
from cluster.launcher import Cluster, replace_sections
from scheduler.sampling_params import SamplingParams
from worker.models.presets import PRESETS

pytestmark = pytest.mark.gpu

NEW_TOKENS = 128


@pytest.fixture(scope="module")
def llama_1b_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = {k: v for k, v in PRESETS["llama-3.2-1b"].items() if k != "architectures"}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.bfloat16)
    path = tmp_path_factory.mktemp("llama-1b")
    model.save_pretrained(path)
    return path


def _serve(path, smollm2_path, tp):
    config = replace_sections(
        Config(),
        model={"model": str(path), "tokenizer": smollm2_path, "max_model_len": 1024},
        parallel={"tensor_parallel_size": tp},
        cache={"gpu_memory_utilization": 0.5},
        server={"port": 0},
    )
    return Cluster(config)


def test_tp2_agrees_with_tp1(llama_1b_dir, smollm2_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128256, (16 + 8 * i,), generator=gen).tolist() for i in range(8)]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    one = _serve(llama_1b_dir, smollm2_path, 1)
    try:
        with Client(one.start()) as client:
            streams = [client.generate(p, greedy, timeout=600) for p in prompts]
            refs = [[t for d in s for t in d.token_ids] for s in streams]
    finally:
        one.shutdown()
    two = _serve(llama_1b_dir, smollm2_path, 2)
    step = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    try:
        with Client(two.start()) as client:
            assert len(client.server_info().replicas[0].workers) == 2
            streams = [
                (ref[j], client.generate(p + ref[:j], step, timeout=600))
                for p, ref in zip(prompts, refs, strict=True)
                for j in range(NEW_TOKENS)
            ]
            agree = sum(expected == next(iter(s)).token_ids[0] for expected, s in streams)
    finally:
        two.shutdown()
    rate = agree / len(streams)
    print(f"TP=2 vs TP=1 (Llama-1B random, bf16): {rate:.2%} of {len(streams)} tokens agree")
    assert rate >= 0.99
