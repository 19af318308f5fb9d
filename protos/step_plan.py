"""The workers' reading of a StepPlan's CachedRequests (worker.proto), written once for the
worker and the tests' fake worker: as one entry per request,

    request_ids           [a,      b]
    num_new_blocks        [2,      0]        new_block_ids [7, 9]
    -> [CachedRequest(a, ..., new_block_ids=[7, 9], ...), CachedRequest(b, ..., [], ...)]

or, for the worker's step loop, as numpy arrays (CachedArrays: no Python object per request
but its id; request i's new blocks are new_block_ids[block_starts[i]:block_starts[i + 1]]).
"""

from typing import NamedTuple

import numpy as np

from protos import worker_pb2


class CachedRequest(NamedTuple):
    """One entry of a plan's CachedRequests arrays."""

    request_id: str
    num_computed_tokens: int  # as the scheduler counts them: the worker checks its own
    num_scheduled_tokens: int
    new_block_ids: list[int]  # appended to its block table, or the whole table when replaced
    replace_block_table: bool


def cached_requests(plan: worker_pb2.StepPlan) -> list[CachedRequest]:
    """The plan's cached requests, in plan order."""
    c = plan.cached_requests
    blocks = list(c.new_block_ids)
    out = []
    start = 0
    for rid, computed, n, num_new, replace in zip(
        c.request_ids,
        c.num_computed_tokens,
        c.num_scheduled_tokens,
        c.num_new_blocks,
        c.replace_block_table,
        strict=True,
    ):
        out.append(CachedRequest(rid, computed, n, blocks[start : start + num_new], replace))
        start += num_new
    if start != len(blocks):
        raise ValueError(f"a plan's num_new_blocks sum to {start}, new_block_ids has {len(blocks)}")
    return out


class CachedArrays(NamedTuple):
    """A plan's CachedRequests as arrays, n requests in plan order."""

    request_ids: list[str]  # [n]
    num_computed_tokens: np.ndarray  # [n] int64, as the scheduler counts them
    num_scheduled_tokens: np.ndarray  # [n] int64
    block_starts: np.ndarray  # [n + 1] int64: offsets of each request's new blocks
    new_block_ids: np.ndarray  # [block_starts[n]] int32
    replace_block_table: np.ndarray  # [n] bool


def cached_arrays(plan: worker_pb2.StepPlan) -> CachedArrays:
    """The plan's cached requests as arrays; the parallel fields must have one length."""
    c = plan.cached_requests
    n = len(c.request_ids)
    fields = {
        "num_computed_tokens": c.num_computed_tokens,
        "num_scheduled_tokens": c.num_scheduled_tokens,
        "num_new_blocks": c.num_new_blocks,
        "replace_block_table": c.replace_block_table,
    }
    for name, values in fields.items():
        if len(values) != n:
            raise ValueError(f"a plan's cached_requests.{name} has {len(values)} entries, not {n}")
    block_starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.array(c.num_new_blocks, np.int64), out=block_starts[1:])
    blocks = np.array(c.new_block_ids, np.int32)
    if block_starts[-1] != len(blocks):
        raise ValueError(
            f"a plan's num_new_blocks sum to {block_starts[-1]}, new_block_ids has {len(blocks)}"
        )
    return CachedArrays(
        list(c.request_ids),
        np.array(c.num_computed_tokens, np.int64),
        np.array(c.num_scheduled_tokens, np.int64),
        block_starts,
        blocks,
        np.array(c.replace_block_table, bool),
    )
