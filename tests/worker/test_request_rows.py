"""The runner's per-row arrays (worker.request_rows) against the plans: requests that leave,
come back or hand their row to another while a token of theirs is in flight, and plans the
arrays disagree with."""

import numpy as np
import pytest
import torch

from protos import worker_pb2
from worker.loader import load_model
from worker.model_runner import ModelRunner
from worker.request_rows import RequestRows

GREEDY = worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0)
A, B, C = [5, 17, 99, 3, 42, 42], [7, 8, 9, 10, 11], [60, 61, 62]


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    path, _ = tiny_llama_dir
    return load_model(str(path), "auto", torch.float32, torch.device("cpu"), seed=0)


def fresh_runner(model) -> ModelRunner:
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, seed=0)
    runner.init_cache(num_blocks=32, block_size=4)
    return runner


def new(rid, tokens, blocks):
    return worker_pb2.NewRequest(
        request_id=rid,
        token_ids=tokens,
        sampling=GREEDY,
        block_ids=blocks,
        num_scheduled_tokens=len(tokens),
    )


def decode(*entries):
    """CachedRequests of (request id, computed tokens, new blocks) decoding one token each."""
    return worker_pb2.CachedRequests(
        request_ids=[rid for rid, _, _ in entries],
        num_computed_tokens=[computed for _, computed, _ in entries],
        num_scheduled_tokens=[1] * len(entries),
        num_new_blocks=[len(blocks) for _, _, blocks in entries],
        new_block_ids=[b for _, _, blocks in entries for b in blocks],
        replace_block_table=[False] * len(entries),
    )


def tokens_of(result: worker_pb2.StepResult) -> dict[str, int]:
    return dict(zip(result.request_ids, result.token_ids, strict=True))


def alone(model, rid, prompt, steps) -> list[int]:
    """Greedy tokens of one request with the runner to itself (blocks 20.. of 4 tokens)."""
    runner = fresh_runner(model)
    blocks = list(range(20, 20 + -(-(len(prompt) + steps) // 4)))
    have = -(-len(prompt) // 4)
    out = [
        tokens_of(
            runner.execute(worker_pb2.StepPlan(new_requests=[new(rid, prompt, blocks[:have])]))
        )[rid]
    ]
    for computed in range(len(prompt), len(prompt) + steps - 1):
        grow = [blocks[computed // 4]] if computed % 4 == 0 else []
        plan = worker_pb2.StepPlan(cached_requests=decode((rid, computed, grow)))
        out.append(tokens_of(runner.execute(plan))[rid])
    return out


def test_a_row_handed_on_while_its_token_is_in_flight_receives_none_of_it(model):
    runner = fresh_runner(model)
    first = runner.execute(
        worker_pb2.StepPlan(new_requests=[new("a", A, [0, 1]), new("b", B, [2, 3])])
    )
    a_row = runner.requests["a"].row
    # Step 2 decodes a and b; before its tokens are appended, step 3 drops a and gives its row
    # to c, a new request, while b reads its step-2 token on the device.
    second = runner.launch(worker_pb2.StepPlan(cached_requests=decode(("a", 6, []), ("b", 5, []))))
    third = runner.launch(
        worker_pb2.StepPlan(
            finished_request_ids=["a"],
            new_requests=[new("c", C, [4])],
            cached_requests=decode(("b", 6, [])),
        )
    )
    assert runner.requests["c"].row == a_row
    second_tokens = tokens_of(runner.finish(second))
    assert second_tokens.keys() == {"a", "b"}
    got = tokens_of(runner.finish(third))
    c_tokens, b_tokens = [got["c"]], [tokens_of(first)["b"], second_tokens["b"], got["b"]]
    for computed in (3, 4):
        grow = [5] if computed == 4 else []
        plan = worker_pb2.StepPlan(
            cached_requests=decode(
                ("c", computed, grow), ("b", computed + 4, [6] if computed == 4 else [])
            )
        )
        got = tokens_of(runner.execute(plan))
        c_tokens.append(got["c"])
        b_tokens.append(got["b"])
    assert c_tokens == alone(model, "c", C, 3)
    assert b_tokens == alone(model, "b", B, 5)
    assert runner.rows.history(a_row).tolist() == C + c_tokens


def test_a_request_preempted_and_readmitted_in_one_plan_starts_over_from_the_plan(model):
    runner = fresh_runner(model)
    out = [tokens_of(runner.execute(worker_pb2.StepPlan(new_requests=[new("a", A, [0, 1])])))["a"]]
    out.append(
        tokens_of(runner.execute(worker_pb2.StepPlan(cached_requests=decode(("a", 6, [])))))["a"]
    )
    # Recomputed from its prompt and outputs in other blocks: the old row's state is gone.
    readmit = worker_pb2.StepPlan(
        preempted_request_ids=["a"], new_requests=[new("a", A + out, [8, 9])]
    )
    out.append(tokens_of(runner.execute(readmit))["a"])
    assert out == alone(model, "a", A, 3)
    assert runner.rows.history(runner.requests["a"].row).tolist() == A + out


def test_a_plan_the_arrays_disagree_with_fails_naming_the_request(model):
    runner = fresh_runner(model)
    runner.execute(worker_pb2.StepPlan(new_requests=[new("a", A, [0, 1]), new("b", B, [2, 3])]))
    with pytest.raises(RuntimeError, match="request b: worker computed 5 tokens, plan says 4"):
        runner.launch(worker_pb2.StepPlan(cached_requests=decode(("a", 6, []), ("b", 4, []))))
    # b's 5 tokens and 1 sampled fill its two blocks (8 slots); 3 more do not fit.
    past = worker_pb2.StepPlan(cached_requests=decode(("b", 5, [])))
    past.cached_requests.num_scheduled_tokens[0] = 3
    with pytest.raises(RuntimeError, match="request b: 3 tokens scheduled past"):
        runner.launch(past)


def test_rows_grow_past_their_first_size_keeping_every_row():
    rows = RequestRows(num_rows=2, capacity=4)
    for row in range(5):
        rows.add(row, np.arange(row, row + 3, dtype=np.int32), 0)
    rows.launched(np.arange(5), np.full(5, 3), np.arange(5))
    rows.append(np.arange(5), rows.epoch[:5].copy(), np.full(5, 100))
    rows.add(5, np.arange(10, dtype=np.int32), 0)
    assert [rows.history(r).tolist() for r in range(5)] == [
        [r, r + 1, r + 2, 100] for r in range(5)
    ]
    assert rows.history(5).tolist() == list(range(10))
    assert rows.num_computed[:5].tolist() == [3] * 5
    assert rows.tokens.shape[1] >= 10 and len(rows.num_known) >= 6
