"""The workers' reading of a StepPlan's CachedRequests (worker.proto): its parallel arrays as
one entry per request, written once for the worker and the tests' fake worker.

    request_ids           [a,      b]
    num_new_blocks        [2,      0]        new_block_ids [7, 9]
    -> [CachedRequest(a, ..., new_block_ids=[7, 9], ...), CachedRequest(b, ..., [], ...)]
"""

from typing import NamedTuple

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
