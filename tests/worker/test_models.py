"""Every architecture on the paged cache against HF transformers, same weights, fp32 CPU."""

import pytest
import torch

from tests.conftest import TINY_ARCHS, hf_greedy
from tests.worker.conftest import greedy_plan_runner
from worker.loader import load_model
from worker.model_runner import ModelRunner

PROMPTS = [[5, 17, 99, 3], [42] * 9, list(range(30, 53)), [7]]


def _runner(path):
    model = load_model(str(path), "auto", torch.float32, torch.device("cpu"), seed=0)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, seed=0)
    runner.init_cache(num_blocks=64, block_size=4)
    return runner


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_greedy_matches_hf(tiny_models, arch):
    path, hf = tiny_models[arch]
    got = greedy_plan_runner(_runner(path), PROMPTS, max_new_tokens=12)
    assert got == [hf_greedy(hf, p, 12) for p in PROMPTS]


def test_chunked_prefill_equals_whole_prefill(tiny_llama_dir):
    path, _ = tiny_llama_dir
    whole = greedy_plan_runner(_runner(path), PROMPTS, max_new_tokens=6)
    for chunk in (1, 3, 5):
        assert greedy_plan_runner(_runner(path), PROMPTS, max_new_tokens=6, chunk=chunk) == whole


def test_logits_match_hf(tiny_llama_dir):
    path, hf = tiny_llama_dir
    runner = _runner(path)
    prompt = PROMPTS[2]
    from protos import worker_pb2

    plan = worker_pb2.StepPlan(
        new_requests=[
            worker_pb2.NewRequest(
                request_id="x",
                token_ids=prompt,
                # logprobs: the runner gathers the logits (plain greedy takes the argmax alone)
                sampling=worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0, logprobs=0),
                block_ids=list(range(6)),
                num_scheduled_tokens=len(prompt),
            )
        ]
    )
    captured = {}
    lm_head = runner.model.lm_head
    original = lm_head.gather_logits
    lm_head.gather_logits = lambda local: captured.setdefault("logits", original(local))
    runner.execute(plan)
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(captured["logits"][0], expected, rtol=1e-5, atol=1e-5)
