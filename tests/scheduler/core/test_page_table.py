"""The page table alone: growth, the prefix cache, forks with copy-on-write, swapping, and a
stateful property test over random interleavings of all of them."""

import zlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.core.block_hash import hash_block
from scheduler.core.page_table import PageTableManager
from scheduler.core.request import Request
from scheduler.sampling_params import SamplingParams


def make_request(rid, tokens, salt=""):
    return Request(
        request_id=rid,
        prompt_token_ids=list(tokens),
        sampling_params=SamplingParams(temperature=0, max_tokens=8),
        eos_token_ids=frozenset(),
        max_model_len=1024,
        cache_salt=salt,
    )


def grow(pt, request, n, cached=()):
    """Allocates like the scheduler does and marks the tokens computed."""
    assert pt.allocate(request, n, cached)
    request.num_computed_tokens += len(cached) * pt.block_size + n


def admit(pt, request):
    """Admits a new request after its cached prefix, computing the rest of its tokens."""
    cached = pt.cached_prefix(request)
    grow(pt, request, request.num_tokens - len(cached) * pt.block_size, cached)
    return cached


def test_allocate_grows_tables_block_by_block():
    pt = PageTableManager(num_blocks=4, block_size=4)
    a = make_request("a", range(9))
    grow(pt, a, 5)
    assert pt.block_tables["a"] == [0, 1]
    grow(pt, a, 3)  # still covered
    assert pt.block_tables["a"] == [0, 1]
    grow(pt, a, 1)
    assert pt.block_tables["a"] == [0, 1, 2] and pt.num_free_blocks == 1
    pt.check_invariants()


def test_allocate_fails_whole_when_short():
    pt = PageTableManager(num_blocks=2, block_size=4)
    grow(pt, make_request("a", range(4)), 4)
    assert not pt.allocate(make_request("b", range(8)), 8)
    assert "b" not in pt.block_tables and pt.num_free_blocks == 1
    pt.check_invariants()


def test_a_prefix_hit_skips_full_blocks_but_never_the_last_token():
    pt = PageTableManager(num_blocks=16, block_size=4)
    admit(pt, make_request("a", range(10)))  # blocks 0, 1 full and cached; 2 partial
    b = make_request("b", [*range(8), 99, 98])
    assert pt.cached_prefix(b) == [0, 1]
    assert pt.cached_prefix(make_request("c", [*range(4), 7, 7, 7, 7])) == [0]
    # All 8 tokens of d are cached, but the last one must be computed to sample from it.
    assert pt.cached_prefix(make_request("d", range(8))) == [0]
    admit(pt, b)
    assert pt.block_tables["b"][:2] == [0, 1] and pt.pool.ref_counts[0] == 2
    pt.check_invariants()


def test_freed_full_blocks_stay_cached_and_are_evicted_least_recently_freed_first():
    pt = PageTableManager(num_blocks=6, block_size=2)
    admit(pt, make_request("a", [1, 2, 3, 4, 5]))  # [0, 1] full, [2] partial
    admit(pt, make_request("b", [7, 8, 9, 9, 5]))  # [3, 4] full, [5] partial
    pt.free("a")
    pt.free("b")
    assert pt.num_free_blocks == 6 and pt.pool.num_free_cached == 4
    assert pt.cached_prefix(make_request("a2", [1, 2, 3, 4, 0])) == [0, 1]
    # A fresh block takes plain blocks (the partial ones) first, then evicts a's tail, a's head.
    c = make_request("c", range(20, 26))
    grow(pt, c, 6)
    assert pt.block_tables["c"] == [2, 5, 1]
    assert pt.cached_prefix(make_request("a3", [1, 2, 3, 4, 0])) == [0]
    assert pt.cached_prefix(make_request("b2", [7, 8, 9, 9, 0])) == [3, 4]
    pt.check_invariants()


def test_a_hit_on_a_free_cached_block_takes_it_out_of_the_free_queue():
    pt = PageTableManager(num_blocks=3, block_size=2)
    admit(pt, make_request("a", [1, 2, 3, 4, 5]))
    pt.free("a")
    b = make_request("b", [1, 2, 3, 4, 6, 6])
    assert admit(pt, b) == [0, 1]
    assert pt.block_tables["b"] == [0, 1, 2] and pt.num_free_blocks == 0
    # Everything is held: a new request cannot evict b's cached blocks.
    assert not pt.allocate(make_request("c", [5]), 1)
    pt.check_invariants()


def test_salts_and_disabled_caching_keep_caches_apart():
    pt = PageTableManager(num_blocks=8, block_size=2)
    admit(pt, make_request("a", [1, 2, 3, 4, 5], salt="tenant-1"))
    assert pt.cached_prefix(make_request("b", [1, 2, 3, 4, 5], salt="tenant-1")) == [0, 1]
    assert pt.cached_prefix(make_request("c", [1, 2, 3, 4, 5], salt="tenant-2")) == []
    assert pt.cached_prefix(make_request("d", [1, 2, 3, 4, 5])) == []
    off = PageTableManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    admit(off, make_request("a", [1, 2, 3, 4, 5]))
    off.free("a")
    assert off.cached_prefix(make_request("b", [1, 2, 3, 4, 5])) == []
    assert off.pool.num_free_cached == 0


def test_block_hashes_chain_the_whole_prefix():
    first = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == first  # deterministic
    assert hash_block(first, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
    assert hash_block(None, [1, 2], "salt") != first
    assert len(first) == 32


def test_fork_shares_blocks_and_the_first_writer_copies_the_partial_one():
    pt = PageTableManager(num_blocks=8, block_size=4)
    parent = make_request("p", range(6))  # [0] full, [1] partial
    admit(pt, parent)
    parent.output_token_ids.append(50)
    child = parent.fork(1)
    pt.fork(parent, child)
    child.num_computed_tokens = 5  # recomputes the last prompt token
    assert pt.block_tables["p#1"] == [0, 1] and pt.pool.ref_counts[1] == 2
    grow(pt, parent, 1)  # position 6 lands in the shared block 1: copied first
    assert pt.block_tables["p"] == [0, 2]
    grow(pt, child, 1)  # the child now holds block 1 alone: written in place
    assert pt.block_tables["p#1"] == [0, 1]
    ops = pt.take_block_ops()
    assert ops.copies == [(1, 2)] and ops.rewritten == {"p"}
    assert pt.take_block_ops().copies == []
    pt.check_invariants()


def test_swap_out_and_in_move_the_table_through_host_memory():
    pt = PageTableManager(num_blocks=4, block_size=2, num_host_blocks=3)
    a = make_request("a", [1, 2, 3])
    admit(pt, a)
    assert pt.swap_out(a)
    assert "a" not in pt.block_tables and pt.host_tables["a"] == [2, 1]
    assert pt.num_free_blocks == 4 and pt.num_free_host_blocks == 1
    grow(pt, make_request("c", range(10, 16)), 6)  # the plain blocks 2, 3 and a's partial 1
    a.output_token_ids.append(4)
    assert not pt.swap_in(a, 1)  # needs 2 blocks, 1 is free
    pt.free("c")
    assert pt.swap_in(a, 1)
    ops = pt.take_block_ops()
    assert ops.swap_out == [(0, 2), (1, 1)]
    assert [host for host, _ in ops.swap_in] == [2, 1] and ops.rewritten == {"a"}
    assert pt.num_free_host_blocks == 3
    pt.check_invariants()


def test_a_swap_needs_host_room():
    pt = PageTableManager(num_blocks=4, block_size=2, num_host_blocks=1)
    a = make_request("a", [1, 2, 3])
    admit(pt, a)
    assert not pt.swap_out(a)
    assert pt.block_tables["a"] and not pt.host_tables
    pt.check_invariants()


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="num_blocks"):
        PageTableManager(0, 16)


def sampled(request):
    """A "sampled" token that differs between requests (forks of one prompt diverge)."""
    return 3 + zlib.crc32(f"{request.request_id}:{request.num_tokens}".encode()) % 5


class PageTableMachine(RuleBasedStateMachine):
    """Random steps (preempt by free or swap, then swap in, grow and admit), forks and
    finishes over a tiny cache, with prompts from a two-token alphabet so that prefixes repeat.

    Beside the page table it keeps a simulated KV cache holding token ids, and applies each
    step's block operations and writes to it: after every step, each held block is referenced
    by exactly the tables holding it, and every request finds its computed tokens in its blocks,
    so a block handed out while referenced (or a copy or swap gone wrong) is caught."""

    BS = 2

    def __init__(self):
        super().__init__()
        self.pt = PageTableManager(num_blocks=10, block_size=self.BS, num_host_blocks=4)
        self.device = [[None] * self.BS for _ in range(10)]
        self.host = [[None] * self.BS for _ in range(4)]
        self.running: dict[str, Request] = {}
        self.waiting: dict[str, Request] = {}
        self.swapped: dict[str, Request] = {}
        self.next_id = 0

    @rule(prompt=st.lists(st.sampled_from([1, 2]), min_size=1, max_size=9))
    def add(self, prompt):
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.waiting[rid] = make_request(rid, prompt)

    @rule(data=st.data())
    def step(self, data):
        pick = lambda pool: data.draw(st.lists(st.sampled_from(sorted(pool)), unique=True))  # noqa: E731
        pt = self.pt
        for rid in pick(self.running) if self.running else []:  # preempt: free or swap out
            request = self.running.pop(rid)
            if data.draw(st.booleans()) and pt.swap_out(request):
                self.swapped[rid] = request
            else:
                pt.free(rid)
                request.num_computed_tokens = 0
                self.waiting[rid] = request
        before = {rid: set(table) for rid, table in pt.block_tables.items()}
        held = set().union(*before.values())
        writes, hits = [], {}
        for rid in pick(self.swapped) if self.swapped else []:
            request = self.swapped[rid]
            n = request.num_tokens - request.num_computed_tokens
            if pt.swap_in(request, n):
                self.running[rid] = self.swapped.pop(rid)
                writes.append((request, n))
        for rid in pick(self.running) if self.running else []:
            request = self.running[rid]
            if rid not in before:  # swapped in just now
                continue
            n = data.draw(st.integers(1, request.num_tokens - request.num_computed_tokens))
            if pt.allocate(request, n):
                writes.append((request, n))
        for rid in pick(self.waiting) if self.waiting else []:
            request = self.waiting[rid]
            cached = pt.cached_prefix(request)
            n = request.num_tokens - len(cached) * self.BS
            assert n >= 1, "a prefix hit covered every token"
            if pt.allocate(request, n, cached):
                request.num_computed_tokens = len(cached) * self.BS
                self.running[rid] = self.waiting.pop(rid)
                writes.append((request, n))
                hits[rid] = set(cached)
        for request, _ in writes:  # a block a table held is never handed out fresh
            rid = request.request_id
            fresh = set(pt.block_tables[rid]) - before.get(rid, set()) - hits.get(rid, set())
            assert not fresh & held, f"{rid} got blocks {fresh & held}, held by other tables"
        self._run(pt.take_block_ops(), writes)

    def _run(self, ops, writes):
        """Applies the step to the simulated cache, like the worker, and checks what it reads."""
        for pairs, source, target in (
            (ops.swap_out, self.device, self.host),
            (ops.swap_in, self.host, self.device),
            (ops.copies, self.device, self.device),
        ):
            dsts = [dst for _, dst in pairs]
            assert len(set(dsts)) == len(dsts), "two operations write one block"
            values = [list(source[src]) for src, _ in pairs]
            for dst, value in zip(dsts, values, strict=True):
                target[dst] = value
        for request, n in writes:
            table = self.pt.block_tables[request.request_id]
            start = request.num_computed_tokens
            for pos in range(start, start + n):
                self.device[table[pos // self.BS]][pos % self.BS] = request.token_ids(pos, pos + 1)[
                    0
                ]
            request.num_computed_tokens = start + n
            if request.num_computed_tokens == request.num_tokens:
                request.output_token_ids.append(sampled(request))
        for request in self.running.values():
            table = self.pt.block_tables[request.request_id]
            end = request.num_computed_tokens
            context = [self.device[table[p // self.BS]][p % self.BS] for p in range(end)]
            assert context == request.token_ids(0, end), f"{request.request_id}: wrong KV"

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        if parent.num_computed_tokens < parent.num_prompt_tokens:
            return
        child = parent.fork(self.next_id)
        self.next_id += 1
        self.pt.fork(parent, child)
        child.num_computed_tokens = child.num_prompt_tokens - 1
        self.running[child.request_id] = child

    @precondition(lambda self: self.running or self.waiting or self.swapped)
    @rule(data=st.data())
    def finish(self, data):
        queues = [q for q in (self.running, self.waiting, self.swapped) if q]
        queue = data.draw(st.sampled_from(queues))
        rid = data.draw(st.sampled_from(sorted(queue)))
        del queue[rid]
        self.pt.free(rid)

    @invariant()
    def consistent(self):
        pt = self.pt
        pt.check_invariants()
        assert set(pt.block_tables) == set(self.running)
        assert set(pt.host_tables) == set(self.swapped)
        for request in self.running.values():
            table = pt.block_tables[request.request_id]
            assert len(table) >= pt.blocks_for(request.num_computed_tokens)
        assert pt.num_free_blocks + len({b for t in pt.block_tables.values() for b in t}) == 10

    def teardown(self):
        for rid in [*self.running, *self.waiting, *self.swapped]:
            self.pt.free(rid)
        self.pt.take_block_ops()  # the step that frees them
        self.pt.check_invariants()
        assert self.pt.num_free_blocks == self.pt.num_blocks
        assert self.pt.num_free_host_blocks == self.pt.num_host_blocks
        assert not self.pt.block_tables and not self.pt.host_tables


TestPageTable = PageTableMachine.TestCase
TestPageTable.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
