"""PlanBuilder's plan against the same fields filled value by value (a step of steady decodes
only has its fields packed as bytes: they must parse to the very lists)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from protos import worker_pb2
from scheduler.core.page_table import BlockOps
from scheduler.core.plan_builder import PlanBuilder

# A cached request's entry: tokens, new blocks, whether they replace its table. Most are steady
# decodes (1, [], False); values past 127 take varints of two bytes and more.
entries = st.lists(
    st.one_of(
        st.just((1, [], False)),
        st.tuples(
            st.integers(1, 70000),
            st.lists(st.integers(0, 2**31 - 1), max_size=3),
            st.booleans(),
        ),
    ),
    max_size=40,
)


@given(entries)
@settings(max_examples=200, deadline=None)
def test_the_cached_requests_are_those_filled_value_by_value(entries):
    builder = PlanBuilder()
    for i, (n, blocks, replace) in enumerate(entries):
        builder.add_cached(f"r{i}", 10 * i, n, blocks, replace)
    plan = builder.build(7, BlockOps(), ["gone"], [], [])

    expected = worker_pb2.CachedRequests(
        request_ids=[f"r{i}" for i in range(len(entries))],
        num_computed_tokens=[10 * i for i in range(len(entries))],
        num_scheduled_tokens=[n for n, _, _ in entries],
        num_new_blocks=[len(blocks) for _, blocks, _ in entries],
        new_block_ids=[b for _, blocks, _ in entries for b in blocks],
        replace_block_table=[replace for _, _, replace in entries],
    )
    assert plan.cached_requests == expected
    assert plan.step_id == 7 and list(plan.finished_request_ids) == ["gone"]
