import pytest

from protos import worker_pb2
from worker.model_runner import ModelRunner


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_models):
    return tiny_models["llama"]


GREEDY = worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0)


class RecordingRunner(ModelRunner):
    """A ModelRunner that keeps every executed step's StepResult in `results`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.results: list[worker_pb2.StepResult] = []

    def execute(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        result = super().execute(plan)
        self.results.append(result)
        return result


def greedy_plan_runner(
    runner: ModelRunner,
    prompts,
    max_new_tokens,
    chunk=None,
    block_size=4,
    on_result=None,
    sampling: worker_pb2.SamplingOptions = GREEDY,
):
    """Drives a ModelRunner like the scheduler would, one request after another or together.

    chunk: the prefill chunk size (None = whole prompt at once). on_result, if given, is called
    with each step's StepResult (request ids in the order the step sampled them). sampling:
    every request's options (greedy ones: the LM head's argmax, no sampler)."""
    outputs = {str(i): [] for i in range(len(prompts))}
    state = {}
    next_block = 0
    step = 0
    while True:
        step += 1
        plan = worker_pb2.StepPlan(step_id=step)
        for i, prompt in enumerate(prompts):
            rid = str(i)
            if len(outputs[rid]) >= max_new_tokens:
                continue
            computed = state.get(rid, 0)
            total = len(prompt) + len(outputs[rid])
            n = total - computed if chunk is None else min(chunk, total - computed)
            need = -(-(computed + n) // block_size)
            have = -(-computed // block_size) if rid in state else 0
            new_blocks = list(range(next_block, next_block + need - have))
            next_block += len(new_blocks)
            if rid not in state:
                plan.new_requests.append(
                    worker_pb2.NewRequest(
                        request_id=rid,
                        token_ids=prompt,
                        sampling=sampling,
                        block_ids=new_blocks,
                        num_scheduled_tokens=n,
                    )
                )
            else:
                cached = plan.cached_requests
                cached.request_ids.append(rid)
                cached.num_computed_tokens.append(computed)
                cached.num_scheduled_tokens.append(n)
                cached.num_new_blocks.append(len(new_blocks))
                cached.new_block_ids.extend(new_blocks)
                cached.replace_block_table.append(False)
            state[rid] = computed + n
        if not plan.new_requests and not plan.cached_requests.request_ids:
            return [outputs[str(i)] for i in range(len(prompts))]
        result = runner.execute(plan)
        if on_result is not None:
            on_result(result)
        for rid, token in zip(result.request_ids, result.token_ids, strict=True):
            outputs[rid].append(token)
