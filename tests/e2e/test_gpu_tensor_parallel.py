"""On two GPUs: a TP=2 replica (one-shot all-reduce, NCCL) agrees with a TP=1 replica, on
SmolLM2 (9 query / 3 KV heads: uneven shards) and on a ~1B Llama (random weights saved as an HF
checkpoint), bf16, through the whole cluster path.

TP=1 generates 8 x 128 greedy tokens; TP=2 then predicts every next token teacher-forced (one
request per prefix, max_tokens=1): the all-reduce sums bf16 partial products in another order,
so exact free-running equality is not expected.
"""

import pytest
import torch

from cluster.client import Client
from cluster.config import Config
from cluster.launcher import Cluster, replace_sections
from scheduler.sampling_params import SamplingParams
from tests.conftest import PARITY_PROMPTS
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
        # 64 sequences: 11 graph sizes to capture, not the default 51, at each of the four
        # cluster starts. The GPU's default step of 16384 tokens stays: its memory profile
        # runs past SmolLM2's context (tests/worker/test_profile_plan.py).
        scheduler={"max_num_seqs": 64},
        server={"port": 0},
    )
    return Cluster(config)


def _teacher_forced(cluster, prompts, refs) -> float:
    """Fraction of positions where the cluster's greedy next token equals refs'."""
    step = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    with Client(cluster.address) as client:
        streams = [
            (ref[j], client.generate(p + ref[:j], step, timeout=600))
            for p, ref in zip(prompts, refs, strict=True)
            for j in range(len(ref))
        ]
        agree = sum(expected == next(iter(s)).token_ids[0] for expected, s in streams)
    return agree / len(streams)


@pytest.mark.parametrize("model", ["smollm2", "llama-1b-random"])
def test_tp2_agrees_with_tp1(model, llama_1b_dir, smollm2_path, hf_smollm2):
    """TP=1 generates 8 x 128 tokens; then TP=1 itself (the floor: prefill instead of decode)
    and TP=2 predict each next token teacher-forced. TP=2 must agree on 99%, or within 2.5
    points of TP=1's agreement with itself: each rank's bf16 partial sum is rounded once more
    before the all-reduce, which flips near-ties (H200 x2: SmolLM2 97.66% vs floor 99.32%;
    random 1B Llama 93.75% vs 94.14%)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if model == "smollm2":
        path = smollm2_path
        _, tokenizer = hf_smollm2
        prompts = [tokenizer.encode(p) for p in PARITY_PROMPTS]
    else:
        path = llama_1b_dir
        gen = torch.Generator().manual_seed(1)
        prompts = [
            torch.randint(0, 128256, (16 + 8 * i,), generator=gen).tolist() for i in range(8)
        ]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    one = _serve(path, smollm2_path, 1)
    try:
        with Client(one.start()) as client:
            streams = [client.generate(p, greedy, timeout=600) for p in prompts]
            refs = [[t for d in s for t in d.token_ids] for s in streams]
        floor = _teacher_forced(one, prompts, refs)
    finally:
        one.shutdown()
    two = _serve(path, smollm2_path, 2)
    try:
        two.start()
        with Client(two.address) as client:
            workers = client.server_info().replicas[0].workers
            assert len(workers) == 2
            # The GPU hosts this runs on link their cards by NVLink: the decode step's
            # all-reduces must take the one-shot path, not fall back to NCCL.
            assert all(w.all_reduce.startswith("fused with RMSNorm") for w in workers), workers
        rate = _teacher_forced(two, prompts, refs)
    finally:
        two.shutdown()
    print(
        f"TP=2 vs TP=1 ({model}, bf16): {rate:.2%} of {8 * NEW_TOKENS} tokens agree; "
        f"TP=1 teacher-forced vs its own generation: {floor:.2%}"
    )
    assert rate >= 0.99 or rate >= floor - 0.025
