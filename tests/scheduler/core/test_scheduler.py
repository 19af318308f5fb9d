"""The policy, driven without a model: FakeWorker plays the workers, applying every plan to a
simulated KV cache of token ids and checking each request's context after every step."""

import zlib

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from protos.step_plan import cached_requests
from scheduler.config import POLICIES, SchedulerConfig
from scheduler.core.page_table import PageTableManager
from scheduler.core.request import Request, RequestStatus
from scheduler.core.scheduler import RequestRefused, Scheduler
from scheduler.sampling_params import SamplingParams
from tests.scheduler.fake_worker import FakeWorker

EOS = 2


def make_request(rid, prompt, max_tokens=4, priority=0, **params):
    """prompt: a length (tokens 10, 11, ...) or the token ids."""
    tokens = list(range(10, 10 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling_params=SamplingParams(temperature=0, max_tokens=max_tokens, **params),
        eos_token_ids=frozenset([EOS]),
        max_model_len=1024,
        priority=priority,
    )


class Harness:
    """A scheduler over a page table, and a FakeWorker that runs its plans."""

    def __init__(
        self,
        num_blocks=64,
        block_size=4,
        max_tokens=64,
        max_seqs=8,
        policy="fcfs",
        caching=True,
        host_blocks=0,
        max_steps_passed_over=16,
        long_prefill=0,
    ):
        self.pt = PageTableManager(num_blocks, block_size, caching, host_blocks)
        config = SchedulerConfig(
            max_seqs,
            max_tokens,
            policy,
            max_steps_passed_over,
            long_prefill_token_threshold=long_prefill,
        )
        self.sched = Scheduler(config, self.pt)
        self.worker = FakeWorker(num_blocks, block_size, host_blocks)

    def step(self, token=lambda rid, num_tokens: 7):
        """Schedules a step, runs it on the fake worker and answers its tokens like rank 0."""
        plan = self.sched.schedule()
        ids = self.worker.execute(plan)
        tokens = []
        for rid in ids:
            tokens.append(token(rid, len(self.worker.tokens[rid])))
            self.worker.learn(rid, tokens[-1])
        self.sched.update(ids, tokens)
        return plan

    def run(self, max_steps=500, **kwargs):
        for _ in range(max_steps):
            if not self.sched.has_work():
                return
            self.step(**kwargs)
        raise AssertionError("the scheduler did not finish its requests")


def scheduled(plan):
    out = {r.request_id: r.num_scheduled_tokens for r in plan.new_requests}
    out.update({r.request_id: r.num_scheduled_tokens for r in cached_requests(plan)})
    return out


def distinct(rid, num_tokens):
    """A token that differs between requests and positions."""
    return 100 + zlib.crc32(f"{rid}:{num_tokens}".encode()) % 1000


def test_plan_is_a_diff():
    h = Harness()
    h.sched.add_request(make_request("a", 6, max_tokens=8))
    first = h.step()
    assert [r.request_id for r in first.new_requests] == ["a"]
    assert list(first.new_requests[0].token_ids) == list(range(10, 16))
    second = h.step()
    assert not second.new_requests
    (cached,) = cached_requests(second)
    assert (cached.num_computed_tokens, cached.num_scheduled_tokens) == (6, 1)
    assert list(cached.new_block_ids) == [] and not cached.replace_block_table
    h.step()  # position 7
    fourth = h.step()
    assert len(cached_requests(fourth)[0].new_block_ids) == 1  # position 8 opens block 2


def test_new_requests_join_running_ones_and_finished_ones_are_dropped():
    h = Harness()
    h.sched.add_request(make_request("a", 3, max_tokens=4))
    h.step()
    h.sched.add_request(make_request("b", 5, max_tokens=1))
    assert scheduled(h.step()) == {"a": 1, "b": 5}
    assert "b" not in h.sched.requests  # max_tokens=1: finished after its prefill
    assert list(h.step().finished_request_ids) == ["b"]
    h.step()
    assert not h.sched.has_work()  # a: 4 tokens
    assert h.pt.num_free_blocks == h.pt.num_blocks


def test_chunked_prefill_spends_the_budget_after_decodes():
    h = Harness(max_tokens=8)
    h.sched.add_request(make_request("a", 2, max_tokens=10))
    h.step()
    h.sched.add_request(make_request("long", 20, max_tokens=2))
    plans = [h.step() for _ in range(3)]
    assert [scheduled(p) for p in plans] == [
        {"a": 1, "long": 7},
        {"a": 1, "long": 7},
        {"a": 1, "long": 6},
    ]
    assert h.sched.requests["long"].output_token_ids == [7]  # sampled only after the last chunk


def test_preemption_recomputes_the_latest_request():
    h = Harness(num_blocks=4, block_size=4, caching=False)
    h.sched.add_request(make_request("a", 4, max_tokens=8))
    h.sched.add_request(make_request("b", 4, max_tokens=8))
    h.step()  # a: block 0, b: block 1
    for _ in range(5):
        h.step()
    assert h.sched.stats.num_preemptions >= 1 and h.sched.stats.num_swapped_out == 0
    assert h.sched.requests["a"].num_preemptions == 0  # the earlier request keeps its blocks
    resumed = []
    while h.sched.has_work():
        plan = h.step()
        resumed += [r for r in plan.new_requests if r.request_id == "b"]
    # b comes back with every token it had (prompt and outputs) and recomputes them.
    assert resumed and len(resumed[0].token_ids) > 4 and resumed[0].num_computed_tokens == 0
    h.pt.check_invariants()
    assert h.pt.num_free_blocks == h.pt.num_blocks


def test_eos_and_stop_token_ids_finish():
    h = Harness()
    h.sched.add_request(make_request("a", 3, max_tokens=10))
    h.sched.add_request(make_request("b", 3, max_tokens=10, stop_token_ids=[9], ignore_eos=True))
    h.sched.add_request(make_request("c", 3, max_tokens=2, ignore_eos=True))
    a, b, c = (h.sched.requests[rid] for rid in "abc")
    h.step(token=lambda rid, n: EOS)
    assert "a" not in h.sched.requests  # eos
    assert "c" in h.sched.requests  # ignores eos
    h.step(token=lambda rid, n: 9)
    assert "b" not in h.sched.requests and "c" not in h.sched.requests
    assert (a.finish_reason, a.stop_reason) == ("stop", None)  # EOS names no reason
    assert (b.finish_reason, b.stop_reason) == ("stop", 9)
    assert (c.finish_reason, c.stop_reason) == ("length", None)


def test_a_stop_string_finishes_and_frees_like_a_stop_token():
    h = Harness()
    h.sched.add_request(make_request("a", 3, max_tokens=10))
    h.sched.add_request(make_request("b", 3, max_tokens=1))
    a, b = h.sched.requests["a"], h.sched.requests["b"]
    h.step()
    h.sched.stop_request(a, "\n\n")
    h.sched.stop_request(b, "!")  # ended by its length on the token that completed the string
    assert "a" not in h.sched.requests and h.pt.num_free_blocks == h.pt.num_blocks
    assert (a.finish_reason, a.stop_reason) == ("stop", "\n\n")
    assert (b.finish_reason, b.stop_reason) == ("stop", "!")
    assert set(h.sched.schedule().finished_request_ids) == {"a", "b"}


def test_a_cached_prefix_is_not_computed_again():
    h = Harness(block_size=4)
    h.sched.add_request(make_request("a", range(10, 20), max_tokens=2))
    h.run()
    h.sched.add_request(make_request("b", [*range(10, 18), 5, 6, 7], max_tokens=2))
    first = h.step()
    (new,) = first.new_requests
    assert (new.num_computed_tokens, new.num_scheduled_tokens) == (8, 3)  # blocks 0 and 1 hit
    h.run()
    stats = h.sched.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 11, 8)
    assert stats.num_prompt_tokens_computed == 10 + 3


def test_a_repeated_prompt_still_computes_its_last_token():
    h = Harness(block_size=4)
    h.sched.add_request(make_request("a", 8, max_tokens=1))
    h.run()
    h.sched.add_request(make_request("b", 8, max_tokens=1))
    (new,) = h.step().new_requests
    assert (new.num_computed_tokens, new.num_scheduled_tokens) == (4, 4)
    assert h.sched.stats.prefix_cache_hits == 4


def test_requests_admitted_together_share_the_prefix_the_first_computes():
    h = Harness(block_size=4)
    for rid in "abc":
        h.sched.add_request(make_request(rid, [*range(10, 22), ord(rid)], max_tokens=2))
    plan = h.step()
    assert scheduled(plan) == {"a": 13, "b": 1, "c": 1}
    h.run()
    assert h.sched.stats.num_prompt_tokens_computed == 15


def test_parallel_sampling_forks_after_the_prompt_and_copies_on_write():
    h = Harness(block_size=4)
    h.sched.add_request(make_request("p", 6, max_tokens=3, n=3, seed=40, ignore_eos=True))
    first = h.step(token=distinct)
    assert scheduled(first) == {"p": 6}
    second = h.step(token=distinct)
    # The children enter with the prompt's blocks and recompute its last token.
    assert scheduled(second) == {"p": 1, "p#1": 1, "p#2": 1}
    children = {r.request_id: r for r in second.new_requests}
    assert {r.num_computed_tokens for r in children.values()} == {5}
    assert [r.sampling.seed for r in (children["p#1"], children["p#2"])] == [41, 42]
    # Block 1 holds positions 4-7, shared by three: two writers copy it, the last writes in place.
    assert len(second.block_copies) == 2 and {c.src for c in second.block_copies} == {1}
    (parent,) = cached_requests(second)
    assert parent.replace_block_table and list(parent.new_block_ids)[0] == 0
    h.run(token=distinct)
    assert not h.sched.has_work() and h.pt.num_free_blocks == h.pt.num_blocks


def test_a_parallel_request_that_finishes_at_once_still_forks():
    h = Harness()
    completions = h.sched.add_request(make_request("p", 5, max_tokens=1, n=2))
    h.step()
    assert completions[0].status is RequestStatus.FINISHED_LENGTH
    assert completions[1].status is RequestStatus.RUNNING
    h.run()
    assert completions[1].output_token_ids == [7]


def test_abort_takes_every_completion():
    h = Harness()
    h.sched.add_request(make_request("p", 5, max_tokens=8, n=3))
    h.step()
    h.step()
    aborted = h.sched.abort_request("p")
    assert sorted(r.request_id for r in aborted) == ["p", "p#1", "p#2"]
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in aborted)
    assert sorted(h.sched.schedule().finished_request_ids) == ["p", "p#1", "p#2"]
    assert h.pt.num_free_blocks == h.pt.num_blocks and not h.sched.groups


def test_ids_in_use_and_requests_that_never_fit_are_refused():
    h = Harness(num_blocks=4, block_size=4, max_seqs=2)
    h.sched.add_request(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        h.sched.add_request(make_request("a", 3))
    with pytest.raises(RequestRefused, match="cache holds 4"):
        h.sched.add_request(make_request("b", 10, max_tokens=8))  # 17 tokens to compute
    h.sched.add_request(make_request("c", 10, max_tokens=7))  # 16: fits exactly
    with pytest.raises(RequestRefused, match="max_num_seqs"):
        h.sched.add_request(make_request("d", 3, n=3))
    # Refused before any fork is built: 2**31 - 1 of them would take minutes and gigabytes.
    with pytest.raises(RequestRefused, match="max_num_seqs"):
        h.sched.add_request(make_request("e", 3, n=2**31 - 1))
    assert set(h.sched.requests) == {"a", "c"}


def test_priority_policy_admits_lower_values_first():
    h = Harness(max_seqs=2, policy="priority")
    h.sched.add_request(make_request("low", 4, priority=5))
    h.sched.add_request(make_request("high", 4, priority=-1))
    h.sched.add_request(make_request("mid", 4, priority=0))
    assert set(scheduled(h.step())) == {"high", "mid"}
    h.run()
    fcfs = Harness(max_seqs=2)
    for rid in ("low", "high", "mid"):
        fcfs.sched.add_request(make_request(rid, 4))
    assert set(scheduled(fcfs.step())) == {"low", "high"}


def test_priority_policy_preempts_the_lowest_priority_first():
    h = Harness(num_blocks=5, block_size=4, policy="priority", caching=False)
    x, y, z = (
        make_request(r, 4, max_tokens=9, priority=p) for r, p in (("x", 1), ("y", 0), ("z", 2))
    )
    for request in (x, y, z):
        h.sched.add_request(request)
    preempted = []
    while h.sched.has_work():
        preempted += h.step().preempted_request_ids
    assert preempted[0] == "z" and y.num_preemptions == 0


def test_cache_aware_policy_prefers_cached_prefixes_but_bounds_the_wait():
    h = Harness(max_tokens=16, max_seqs=1, policy="cache_aware", max_steps_passed_over=2)
    shared = list(range(50, 58))
    h.sched.add_request(make_request("seed", [*shared, 1], max_tokens=1))
    h.run()
    h.sched.add_request(make_request("cold", [3, 4, 5, 6, 7], max_tokens=1))
    for i in range(5):
        h.sched.add_request(make_request(f"warm{i}", [*shared, i], max_tokens=1))
    order = []
    while h.sched.has_work():
        order += [r.request_id for r in h.step().new_requests]
    # Later arrivals with a cached prefix pass cold over, two steps at most.
    assert order == ["warm0", "warm1", "cold", "warm2", "warm3", "warm4"]


def test_swapping_keeps_the_kv_of_a_long_request_and_resumes_it():
    h = Harness(num_blocks=6, block_size=4, max_tokens=8, caching=False, host_blocks=8)
    h.sched.add_request(make_request("short", 4, max_tokens=10, ignore_eos=True))
    h.sched.add_request(make_request("long", 12, max_tokens=6, ignore_eos=True))
    plans = []
    while h.sched.has_work():
        plans.append(h.step(token=distinct))
    # long ranks last when blocks run out, with 14 tokens computed: more than the step budget
    # of 8, so it goes to host memory and comes back with its KV instead of recomputing it.
    (out,) = [p for p in plans if p.swapped_request_ids]
    assert list(out.swapped_request_ids) == ["long"] and len(out.swap_out) == 4
    (back,) = [p for p in plans if p.swap_in]
    (resumed,) = [r for r in cached_requests(back) if r.request_id == "long"]
    assert resumed.replace_block_table and resumed.num_computed_tokens == 14
    assert [r.request_id for p in plans for r in p.new_requests] == ["short", "long"]
    assert h.sched.stats.num_swapped_out == 1
    assert h.pt.num_free_host_blocks == 8 and h.pt.num_free_blocks == 6


def test_a_long_prompt_computes_at_most_the_threshold_a_step_beside_a_decode():
    h = Harness(max_tokens=64, long_prefill=8)
    h.sched.add_request(make_request("short", 3, max_tokens=12))
    h.step()  # its prompt, then it decodes
    h.sched.add_request(make_request("long", 30, max_tokens=2))
    chunks = []
    while "long" not in h.worker.tokens or len(h.worker.tokens["long"]) <= 30:
        got = scheduled(h.step())
        assert got.get("short") == 1  # the decode goes on every step
        chunks.append(got["long"])
    assert chunks == [8, 8, 8, 6]  # 30 prompt tokens, 8 a step, then its first token sampled
    h.run()
    assert h.pt.num_free_blocks == h.pt.num_blocks


class SchedulerMachine(RuleBasedStateMachine):
    """Random add (n completions, priorities, shared prefixes), step (tokens, some stopping),
    abort and preempt under a tight cache with swap space and a small token budget, for every
    policy: the page table stays consistent, the fake worker always finds each request's context
    in its blocks, every request ends, and nothing leaks."""

    @initialize(
        policy=st.sampled_from(POLICIES),
        caching=st.booleans(),
        host=st.sampled_from([0, 6]),
        long_prefill=st.sampled_from([0, 0, 1, 4]),
    )
    def setup(self, policy, caching, host, long_prefill):
        self.h = Harness(
            num_blocks=12,
            block_size=4,
            max_tokens=6,
            max_seqs=4,
            policy=policy,
            caching=caching,
            host_blocks=host,
            max_steps_passed_over=3,
            long_prefill=long_prefill,
        )
        self.long_prefill = long_prefill
        self.sched, self.pt = self.h.sched, self.h.pt
        self.next_id = 0
        self.ended: list[Request] = []

    @rule(
        prompt=st.lists(st.sampled_from([1, 3]), min_size=1, max_size=20),
        max_tokens=st.integers(1, 10),
        n=st.integers(1, 3),
        priority=st.integers(0, 2),
    )
    def add(self, prompt, max_tokens, n, priority):
        req = make_request(
            f"r{self.next_id}", prompt, max_tokens, priority, n=n, stop_token_ids=[9]
        )
        self.next_id += 1
        self.ended += self.sched.add_request(req)

    @precondition(lambda self: self.sched.has_work())
    @rule(stops=st.sets(st.integers(0, 40)))
    def step(self, stops):
        def token(rid, num_tokens):
            stop = zlib.crc32(f"{rid}:{num_tokens}".encode()) % 41 in stops
            return 9 if stop else 4 + num_tokens % 3

        plan = self.h.step(token=token)
        assert len(scheduled(plan)) <= 4
        assert sum(scheduled(plan).values()) <= 6
        if self.long_prefill:
            assert max(scheduled(plan).values(), default=0) <= self.long_prefill

    @precondition(lambda self: self.sched.groups)
    @rule(data=st.data())
    def abort(self, data):
        group = data.draw(st.sampled_from(sorted(self.sched.groups)))
        for req in self.sched.abort_request(group):
            assert req.status is RequestStatus.FINISHED_ABORTED

    @precondition(lambda self: self.sched.running)
    @rule(data=st.data())
    def preempt(self, data):
        request = data.draw(st.sampled_from(self.sched.running))
        self.sched.preempt(request)
        assert request.status in (RequestStatus.WAITING, RequestStatus.SWAPPED)

    @invariant()
    def consistent(self):
        pt, sched = self.pt, self.sched
        pt.check_invariants()
        assert set(pt.block_tables) == {r.request_id for r in sched.running}
        assert set(pt.host_tables) == {r.request_id for r in sched.swapped}
        for req in sched.running:
            assert len(pt.block_tables[req.request_id]) >= pt.blocks_for(req.num_computed_tokens)
        for req in sched.waiting:
            assert req.num_computed_tokens == 0
        live = {r.request_id for group in sched.groups.values() for r in group}
        assert live == set(sched.requests)

    def teardown(self):
        self.h.run()
        assert all(r.status.finished for r in self.ended)
        for r in self.ended:
            if r.status is RequestStatus.FINISHED_LENGTH:
                assert len(r.output_token_ids) == r.sampling_params.max_tokens
        self.h.step()  # an empty plan tells the workers the last finished ids
        assert not self.h.worker.tables, "the workers still hold requests"
        assert self.pt.num_free_blocks == self.pt.num_blocks
        assert self.pt.num_free_host_blocks == self.pt.num_host_blocks
        assert not self.sched.groups and not self.sched.requests


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
