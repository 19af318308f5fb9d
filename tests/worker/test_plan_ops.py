"""The block operations of a StepPlan on a real model runner: swap out / in through the host
cache and copy-on-write, each checked against greedy decoding without them, on the CPU and (where
there is one) on a GPU."""

import pytest
import torch

from protos import worker_pb2
from worker.loader import load_model
from worker.model_runner import ModelRunner

PROMPT = [5, 17, 99, 3, 42, 42]  # 6 tokens: block 0 full, block 1 half full (block_size 4)
GREEDY = worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def runner(request, tiny_llama_dir):
    """On the CPU, and on a GPU (the Triton block copy, a pinned host cache)."""
    path, _ = tiny_llama_dir
    device = torch.device(request.param)
    model = load_model(str(path), "auto", torch.float32, device, seed=0)
    runner = ModelRunner(model, device, torch.float32, seed=0)
    runner.init_cache(num_blocks=16, block_size=4, num_cpu_blocks=4)
    return runner


def new(rid, blocks, computed=0, tokens=PROMPT):
    return worker_pb2.NewRequest(
        request_id=rid,
        token_ids=tokens,
        sampling=GREEDY,
        block_ids=blocks,
        num_computed_tokens=computed,
        num_scheduled_tokens=len(tokens) - computed,
    )


def decode(rid, computed, new_blocks=(), replace=False):
    """One request decoding one token, as the plan's CachedRequests."""
    return worker_pb2.CachedRequests(
        request_ids=[rid],
        num_computed_tokens=[computed],
        num_scheduled_tokens=[1],
        num_new_blocks=[len(new_blocks)],
        new_block_ids=new_blocks,
        replace_block_table=[replace],
    )


def step(runner, **plan):
    result = runner.execute(worker_pb2.StepPlan(**plan))
    return dict(zip(result.request_ids, result.token_ids, strict=True))


def reference(runner, num_tokens):
    """Greedy tokens of PROMPT (at most 3: blocks 12 and 13), without block operations."""
    out = [step(runner, new_requests=[new("ref", [12, 13])])["ref"]]
    for computed in range(len(PROMPT), len(PROMPT) + num_tokens - 1):
        out.append(step(runner, cached_requests=decode("ref", computed))["ref"])
    return out


def pairs(*pairs):
    return [worker_pb2.BlockCopy(src=src, dst=dst) for src, dst in pairs]


def test_a_swapped_request_resumes_from_host_memory(runner):
    expected = reference(runner, 3)
    first = step(runner, new_requests=[new("a", [0, 1])])["a"]
    # Swap out; another request then overwrites blocks 0 and 1 on the device.
    step(runner, swapped_request_ids=["a"], swap_out=pairs((0, 2), (1, 3)))
    step(runner, new_requests=[new("b", [0, 1], tokens=[7, 8, 9, 10, 11])])
    with pytest.raises(RuntimeError, match="past its tokens or blocks"):  # its table is gone
        step(runner, cached_requests=decode("a", 6))
    back = step(runner, swap_in=pairs((2, 5), (3, 6)), cached_requests=decode("a", 6, [5, 6], True))
    third = step(runner, cached_requests=decode("a", 7))["a"]
    assert [first, back["a"], third] == expected


def test_a_fork_copies_the_shared_block_before_writing_it(runner):
    expected = reference(runner, 3)
    parent = step(runner, new_requests=[new("p", [0, 1])])["p"]
    # The child shares block 0 and recomputes the last prompt token into a copy of block 1,
    # while the parent writes its next token into block 1 itself.
    both = step(
        runner,
        block_copies=pairs((1, 2)),
        cached_requests=decode("p", 6),
        new_requests=[new("c", [0, 2], computed=5)],
    )
    assert parent == expected[0] and both == {"p": expected[1], "c": expected[0]}
    for attn in runner.model.attention_layers():  # position 4 was copied, 5 recomputed
        for cache in (attn.key_cache, attn.value_cache):
            assert torch.equal(cache[2, 0], cache[1, 0])
            torch.testing.assert_close(cache[2, 1], cache[1, 1])
    child = step(runner, cached_requests=decode("c", 6))["c"]
    assert child == expected[1]
