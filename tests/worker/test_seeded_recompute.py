"""A seeded request recomputed (preempted, then sent again with its outputs so far) samples the
same tokens as an undisturbed run: each draw's generator is seeded from (seed, output index),
and a recomputed request's NewRequest tells its outputs from its prompt by prompt_len."""

import pytest
import torch

from protos import worker_pb2
from worker.loader import load_model
from worker.model_runner import ModelRunner

BLOCK = 4
PROMPT = [5, 17, 42, 99, 3, 64]
NEW_TOKENS = 10
PREEMPT_AFTER = 4
SAMPLING = worker_pb2.SamplingOptions(temperature=1.5, top_p=1.0, seed=1234, prompt_len=len(PROMPT))


def _runner(path, device: str) -> ModelRunner:
    dev = torch.device(device)
    runner = ModelRunner(
        load_model(str(path), "auto", torch.float32, dev, seed=0), dev, torch.float32, seed=0
    )
    runner.init_cache(
        num_blocks=64, block_size=BLOCK, max_num_seqs=4, max_model_len=64, enforce_eager=True
    )
    return runner


class _Driver:
    """Sends one request's plans, one step at a time, as the scheduler would (blocks 0..)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.step = 0
        self.outputs: list[int] = []
        self.computed = 0
        self.num_blocks = 0

    def run(self, num_tokens: int, preempted: bool = False) -> None:
        """Samples until the request has num_tokens outputs; first sends it anew (with every
        output so far, and, if preempted, the id it held dropped first)."""
        self.computed, self.num_blocks = 0, 0
        known = PROMPT + self.outputs
        while len(self.outputs) < num_tokens:
            self.step += 1
            plan = worker_pb2.StepPlan(step_id=self.step)
            total = len(PROMPT) + len(self.outputs)
            n = total - self.computed
            needed = -(-total // BLOCK)
            blocks = list(range(self.num_blocks, needed))
            if self.computed == 0:
                if preempted:
                    plan.preempted_request_ids.append("r")
                plan.new_requests.append(
                    worker_pb2.NewRequest(
                        request_id="r",
                        token_ids=known,
                        sampling=SAMPLING,
                        block_ids=blocks,
                        num_scheduled_tokens=n,
                    )
                )
            else:
                c = plan.cached_requests
                c.request_ids.append("r")
                c.num_computed_tokens.append(self.computed)
                c.num_scheduled_tokens.append(n)
                c.num_new_blocks.append(len(blocks))
                c.new_block_ids.extend(blocks)
                c.replace_block_table.append(False)
            self.computed, self.num_blocks = total, needed
            result = self.runner.execute(plan)
            assert list(result.request_ids) == ["r"]
            self.outputs.append(result.token_ids[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_seeded_request_recomputed_samples_what_an_undisturbed_run_samples(tiny_models, device):
    path, _ = tiny_models["llama"]
    undisturbed = _Driver(_runner(path, device))
    undisturbed.run(NEW_TOKENS)
    disturbed = _Driver(_runner(path, device))
    disturbed.run(PREEMPT_AFTER)
    disturbed.run(NEW_TOKENS, preempted=True)
    assert disturbed.outputs == undisturbed.outputs
    assert len(set(undisturbed.outputs)) > 1, "a temperature this high draws varied tokens"
