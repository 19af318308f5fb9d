"""cluster.benchmarks.worker_step's plans on the CPU: with a new prompt every step beside the
batch (--prompt-len), the batch decodes the tokens it decodes alone, and each prompt samples."""

import pytest
import torch

from cluster.benchmarks import worker_step
from cluster.benchmarks.report import SAMPLING
from worker.loader import load_model
from worker.model_runner import ModelRunner

BATCH, CONTEXT, STEPS, PROMPT = 3, 20, 6, 10
LONG_PROMPT = 50  # past the batch's requests' 27 tokens


def _run(path, prompt_len: int, sampling: str = "greedy") -> list:
    model = load_model(str(path), "auto", torch.float32, torch.device("cpu"), seed=0)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, seed=0)
    runner.init_cache(**worker_step.cache_sizes(BATCH, CONTEXT, STEPS, prompt_len))
    plans = worker_step.decode_plans(BATCH, CONTEXT, STEPS, 0, prompt_len, 256, sampling)
    return [runner.execute(plan) for plan in plans]


@pytest.mark.parametrize("preset", sorted(SAMPLING))
def test_every_request_samples_as_the_preset_says(tiny_models, preset):
    """--sampling: each request's options are the preset's (top_p 1 where it sets none), its
    prompt its own token ids; every scheduled request samples a token each step."""
    plans = worker_step.decode_plans(BATCH, CONTEXT, STEPS, 0, PROMPT, 256, preset)
    news = [new for plan in plans for new in plan.new_requests]
    for new in news:
        opts = new.sampling
        assert opts.prompt_len == len(new.token_ids)
        assert opts.top_p == pytest.approx(SAMPLING[preset].get("top_p", 1.0))  # float32
        for key, value in SAMPLING[preset].items():
            assert getattr(opts, key) == pytest.approx(value), key
    results = _run(tiny_models["llama"][0], PROMPT, preset)
    assert [len(r.token_ids) for r in results[1:-1]] == [BATCH + 1] * STEPS


@pytest.mark.parametrize("prompt", [PROMPT, LONG_PROMPT])
def test_prompts_beside_the_batch_leave_its_tokens_as_they_are(tiny_models, prompt):
    """Prompts shorter than the batch's requests and longer (the cache sized for them)."""
    path, _ = tiny_models["llama"]
    alone, beside = _run(path, 0), _run(path, prompt)
    batch = {str(i) for i in range(BATCH)}
    for step, (a, b) in enumerate(zip(alone, beside, strict=True)):
        got = dict(zip(b.request_ids, b.token_ids, strict=True))
        assert dict(zip(a.request_ids, a.token_ids, strict=True)) == {
            rid: t for rid, t in got.items() if rid in batch
        }
        if 1 <= step <= STEPS:  # every decode step's plan prefills one prompt, which samples
            assert set(got) - batch == {f"prompt-{step - 1}"}
    assert sum(len(r.request_ids) for r in alone) == BATCH * (STEPS + 1)


def test_time_steps_counts_the_steps_timed():
    class Runner:
        def execute(self, plan):
            return None

        def launch(self, plan):
            return plan

        def finish(self, plan):
            whole = plan.step_id % 2 == 0
            pieces = plan.step_id % 4 == 1
            return type("Result", (), {"cuda_graph": whole, "piecewise_graph": pieces})()

    plans = worker_step.decode_plans(2, 8, 10, 0, 4)
    times, hits, pieces = worker_step.time_steps(Runner(), plans)
    # 10 decode steps: 9 timed (each from the one before), the first of them warms up.
    assert len(times) == 8 and hits == 4 / 8 and pieces == 2 / 8


def test_the_step_profile_names_what_a_step_spent_its_time_on(tiny_models):
    path, _ = tiny_models["llama"]
    model = load_model(str(path), "auto", torch.float32, torch.device("cpu"), seed=0)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, seed=0)
    runner.init_cache(**worker_step.cache_sizes(BATCH, CONTEXT, 15, PROMPT))
    plans = worker_step.decode_plans(BATCH, CONTEXT, 15, 0, PROMPT, vocab=256)
    head, *calls = worker_step.profile_steps(runner, plans, top=5).splitlines()
    # 15 decode steps: 14 timed, the first 2 warm up, then 10 recorded.
    assert head.startswith("a step under the profiler: ") and head.endswith("(10 steps)")
    assert len(calls) == 5 and all(c.startswith("  host ") for c in calls)  # no kernels on a CPU
    assert any("aten::" in c for c in calls)
    # Each of the busiest host calls runs at least once in every recorded step.
    assert all(float(c.split()[3].rstrip("x")) >= 1.0 for c in calls), calls
