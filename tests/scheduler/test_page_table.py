import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.page_table import PageTableManager


def test_allocate_grows_tables_block_by_block():
    pt = PageTableManager(num_blocks=4, block_size=4)
    assert pt.allocate("a", 5) == [0, 1]
    assert pt.allocate("a", 8) == []  # still covered
    assert pt.allocate("a", 9) == [2]
    assert pt.block_tables["a"] == [0, 1, 2]
    assert pt.num_free_blocks == 1
    pt.check_invariants()


def test_allocate_fails_whole_when_short():
    pt = PageTableManager(num_blocks=2, block_size=4)
    assert pt.allocate("a", 4) == [0]
    assert pt.allocate("b", 8) is None
    assert "b" not in pt.block_tables and pt.num_free_blocks == 1
    pt.check_invariants()


def test_free_returns_blocks_tail_first():
    pt = PageTableManager(num_blocks=3, block_size=2)
    pt.allocate("a", 6)
    pt.free("a")
    assert list(pt.free_queue) == [2, 1, 0]
    pt.free("a")  # freeing twice is harmless
    pt.check_invariants()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        PageTableManager(0, 16)


class PageTableMachine(RuleBasedStateMachine):
    """Random allocate / grow / free; the pool stays consistent and nothing leaks."""

    def __init__(self):
        super().__init__()
        self.pt = PageTableManager(num_blocks=12, block_size=4)
        self.lengths: dict[str, int] = {}
        self.next_id = 0

    @rule(n=st.integers(1, 30))
    def add(self, n):
        rid = f"r{self.next_id}"
        self.next_id += 1
        free_before = self.pt.num_free_blocks
        new = self.pt.allocate(rid, n)
        if new is None:
            assert -(-n // 4) > free_before
        else:
            assert len(new) == -(-n // 4)
            self.lengths[rid] = n

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), extra=st.integers(1, 9))
    def grow(self, data, extra):
        rid = data.draw(st.sampled_from(sorted(self.lengths)))
        in_use = {b for t in self.pt.block_tables.values() for b in t}
        new = self.pt.allocate(rid, self.lengths[rid] + extra)
        if new is not None:
            assert not in_use & set(new), "a referenced block was handed out"
            self.lengths[rid] += extra

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.lengths)))
        self.pt.free(rid)
        del self.lengths[rid]

    @invariant()
    def consistent(self):
        self.pt.check_invariants()
        for rid, n in self.lengths.items():
            assert len(self.pt.block_tables[rid]) == -(-n // 4)

    def teardown(self):
        for rid in list(self.lengths):
            self.pt.free(rid)
        assert self.pt.num_free_blocks == self.pt.num_blocks


TestPageTable = PageTableMachine.TestCase
TestPageTable.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
