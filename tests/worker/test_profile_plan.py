"""The memory profile's step never holds a position beyond the model's context: a step of
max_num_batched_tokens (16384 by default on GPUs) past SmolLM2's 8192 positions read past the
rotary tables (an illegal memory access on 2 x H200). Run here on a CPU runner, where such a
read raises."""

import pytest
import torch

from worker.loader import load_model
from worker.model_runner import ModelRunner
from worker.worker import profile_plan

BLOCK = 4


def _runner(path) -> ModelRunner:
    cpu = torch.device("cpu")
    return ModelRunner(
        load_model(str(path), "auto", torch.float32, cpu, seed=0), cpu, torch.float32, seed=0
    )


def test_profile_plan_splits_at_the_models_context():
    plan, num_blocks = profile_plan(600, 256, BLOCK)
    lengths = [r.num_scheduled_tokens for r in plan.new_requests]
    assert lengths == [256, 256, 88] and [len(r.token_ids) for r in plan.new_requests] == lengths
    blocks = [b for r in plan.new_requests for b in r.block_ids]
    assert blocks == list(range(num_blocks)) and num_blocks == 64 + 64 + 22
    plan, num_blocks = profile_plan(100, 256, BLOCK)
    assert [r.num_scheduled_tokens for r in plan.new_requests] == [100] and num_blocks == 25


def test_the_profile_step_runs_past_the_context_length(tiny_llama_dir):
    runner = _runner(tiny_llama_dir[0])  # (path, HF model)
    longest = runner.model.max_positions  # 256
    plan, num_blocks = profile_plan(2 * longest + 40, longest, BLOCK)
    runner.init_cache(num_blocks, BLOCK)
    runner.execute(plan)
    one_sequence, num_blocks = profile_plan(2 * longest + 40, 10 * longest, BLOCK)
    runner.init_cache(num_blocks, BLOCK)
    with pytest.raises(IndexError):  # what a GPU reads out of bounds
        runner.execute(one_sequence)
