"""The worker's reading of a plan's CachedRequests, as entries and as arrays."""

import pytest

from protos import worker_pb2
from protos.step_plan import cached_arrays, cached_requests


def plan(**cached) -> worker_pb2.StepPlan:
    fields = dict(
        request_ids=["a", "b", "c"],
        num_computed_tokens=[4, 9, 0],
        num_scheduled_tokens=[1, 1, 3],
        num_new_blocks=[2, 0, 1],
        new_block_ids=[7, 8, 5],
        replace_block_table=[False, False, True],
    )
    return worker_pb2.StepPlan(cached_requests=worker_pb2.CachedRequests(**(fields | cached)))


def test_the_arrays_say_what_the_entries_say():
    arrays = cached_arrays(plan())
    entries = cached_requests(plan())
    assert arrays.request_ids == [e.request_id for e in entries]
    assert arrays.num_computed_tokens.tolist() == [e.num_computed_tokens for e in entries]
    assert arrays.num_scheduled_tokens.tolist() == [e.num_scheduled_tokens for e in entries]
    assert arrays.replace_block_table.tolist() == [e.replace_block_table for e in entries]
    starts = arrays.block_starts
    blocks = [arrays.new_block_ids[starts[i] : starts[i + 1]].tolist() for i in range(3)]
    assert blocks == [e.new_block_ids for e in entries] == [[7, 8], [], [5]]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "num_scheduled_tokens",
            [1, 1],
            "cached_requests.num_scheduled_tokens has 2 entries, not 3",
        ),
        (
            "replace_block_table",
            [False],
            "cached_requests.replace_block_table has 1 entries, not 3",
        ),
        ("new_block_ids", [7, 8], "num_new_blocks sum to 3, new_block_ids has 2"),
    ],
)
def test_arrays_of_unequal_lengths_are_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        cached_arrays(plan(**{field: value}))
