"""Async scheduling without a model: a Driver plays the engine loop over a Scheduler and a
FakeWorker with one step in flight (sync) or two (async). Outputs must not depend on it: the
fake worker's token is a function of the completion's id and its tokens so far, so async and sync
runs of one workload give the same tokens, token for token, whatever is preempted when."""

import zlib
from collections import Counter, deque
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.step_plan import cached_requests
from scheduler.config import POLICIES, SchedulerConfig
from scheduler.core.page_table import PageTableManager
from scheduler.core.request import Request, RequestStatus
from scheduler.core.scheduler import Scheduler
from tests.scheduler.core.test_scheduler import make_request as scheduler_test_request
from tests.scheduler.fake_worker import FakeWorker

EOS = 2
STOP_TOKEN = 9


def make_request(rid, prompt, max_tokens=8, **params):
    return scheduler_test_request(rid, prompt, max_tokens, **params)


def next_token(rid: str, tokens: list[int]) -> int:
    """The fake model: 0..11 from the completion's id and every token it holds (EOS is 2)."""
    return zlib.crc32(f"{rid}:{tokens}".encode()) % 12


def counting(rid: str, tokens: list[int]) -> int:
    """A model that never stops: the completion's length, past any EOS or stop token."""
    return 100 + len(tokens)


class Driver:
    """The engine loop, played: plan and send while fewer than `depth` steps are in flight and
    there is work (a step that computes nothing waits while one is in flight), else learn the
    oldest. The worker runs each plan as it is sent (it runs plans in order: as early as it
    can), so it samples ahead of what the scheduler has learned, as a fast device does.

    Learning a step delivers each live completion its token (outputs), then stops those whose
    outputs end with their group's stop sequence (the engine's stop strings), then aborts the
    groups whose first completion has delivered abort_after tokens (a client that reacts)."""

    def __init__(self, depth, num_blocks=64, block_size=4, max_tokens=64, max_seqs=8, **kwargs):
        policy = kwargs.pop("policy", "fcfs")
        host_blocks = kwargs.pop("host_blocks", 0)
        self.pt = PageTableManager(num_blocks, block_size, kwargs.pop("caching", True), host_blocks)
        scheduler = kwargs.pop("scheduler", Scheduler)
        self.sched = scheduler(SchedulerConfig(max_seqs, max_tokens, policy), self.pt)
        self.worker = FakeWorker(num_blocks, block_size, host_blocks)
        self.token = kwargs.pop("token", next_token)
        assert not kwargs, kwargs
        self.depth = depth
        self.in_flight: deque[tuple[list[str], list[int]]] = deque()  # results not learned
        self.plans = []
        self.completions: list[Request] = []
        self.outputs: dict[str, list[int]] = {}  # completion id -> tokens delivered
        self.sampled: Counter[str] = Counter()  # completion id -> tokens the worker sampled
        self.stop_seqs: dict[str, tuple[int, ...]] = {}
        self.abort_after: dict[str, int] = {}
        self.max_pending = 0

    def add(self, request, stop_seq=(), abort_after=None):
        completions = self.sched.add_request(request)
        self.completions += completions
        for c in completions:
            self.outputs[c.request_id] = []
        if stop_seq:
            self.stop_seqs[request.request_id] = tuple(stop_seq)
        if abort_after is not None:
            self.abort_after[request.request_id] = abort_after
        return completions

    def busy(self):
        return self.sched.has_work() or bool(self.in_flight)

    def turn(self):
        """One turn of Engine._loop."""
        if len(self.in_flight) < self.depth and self.sched.has_work():
            plan = self.sched.schedule(skip_empty=bool(self.in_flight))
            if plan is not None:
                self.send(plan)
                if len(self.in_flight) < self.depth:
                    return
        assert self.in_flight, "the loop would wait for nothing"
        self.learn(*self.in_flight.popleft())

    def send(self, plan):
        self.plans.append(plan)
        ids = self.worker.execute(plan)
        tokens = []
        for rid in ids:
            tokens.append(self.token(rid, self.worker.tokens[rid]))
            self.worker.learn(rid, tokens[-1])
            self.sampled[rid] += 1
        self.in_flight.append((ids, tokens))
        for request in self.sched.requests.values():
            assert 0 <= request.num_pending_tokens <= len(self.in_flight)
            self.max_pending = max(self.max_pending, request.num_pending_tokens)

    def learn(self, ids, tokens):
        learned, tokens, finished = self.sched.update(ids, tokens)
        assert finished == [request for request in learned if request.status.finished]
        for request, token in zip(learned, tokens, strict=True):
            self.outputs[request.request_id].append(token)
        for request in learned:
            seq = self.stop_seqs.get(request.group_id)
            if seq and tuple(self.outputs[request.request_id][-len(seq) :]) == seq:
                self.sched.stop_request(request, "stop sequence")
        for group, count in self.abort_after.items():
            if group in self.sched.groups and len(self.outputs[group]) >= count:
                self.sched.abort_request(group)

    def run(self, max_turns=5000):
        for _ in range(max_turns):
            if not self.busy():
                return
            self.turn()
            self.check()
        raise AssertionError("the scheduler did not finish its requests")

    def check(self):
        pt, sched = self.pt, self.sched
        pt.check_invariants()
        assert set(pt.block_tables) == {r.request_id for r in sched.running}
        assert set(pt.host_tables) == {r.request_id for r in sched.swapped}
        for request in sched.waiting:
            assert request.num_computed_tokens == 0
        for request in sched.running:
            assert request.num_tokens + request.num_pending_tokens <= request.max_num_tokens

    def finish(self):
        """Runs to the end; an extra plan tells the workers the last finished ids. Then nothing
        may be left: requests, tables on the workers, blocks, discarded tokens to come."""
        self.run()
        self.worker.execute(self.sched.schedule())
        assert not self.worker.tables, "the workers still hold requests"
        self.pt.check_invariants()
        assert self.pt.num_free_blocks == self.pt.num_blocks
        assert self.pt.num_free_host_blocks == self.pt.num_host_blocks
        assert not self.sched.requests and not self.sched.groups
        assert not self.sched._discarded, "tokens still to discard"
        assert all(r.num_pending_tokens == 0 for r in self.completions)

    def result(self):
        """Each completion's delivered tokens and how it ended."""
        return {
            r.request_id: (self.outputs[r.request_id], r.finish_reason, r.stop_reason)
            for r in self.completions
        }

    def discarded(self):
        """Tokens the workers sampled for each completion that it never delivered."""
        return {
            r.request_id: self.sampled[r.request_id] - len(self.outputs[r.request_id])
            for r in self.completions
        }


def scheduled(plan):
    out = {r.request_id: r.num_scheduled_tokens for r in plan.new_requests}
    out.update({r.request_id: r.num_scheduled_tokens for r in cached_requests(plan)})
    return out


# -- the pieces, one at a time ---------------------------------------------------------------


def test_a_step_computes_the_token_the_step_before_it_samples():
    d = Driver(depth=2, token=counting)
    (a,) = d.add(make_request("a", 6, max_tokens=4))
    d.turn()  # step 1: the prompt, sampling token 6
    assert (a.num_computed_tokens, a.num_pending_tokens) == (6, 1)
    d.send(d.sched.schedule(skip_empty=True))  # step 2 computes token 6, samples token 7
    (cached,) = cached_requests(d.plans[1])
    assert (cached.num_computed_tokens, cached.num_scheduled_tokens) == (6, 1)
    assert (a.num_tokens, a.num_computed_tokens, a.num_pending_tokens) == (6, 7, 2)
    d.learn(*d.in_flight.popleft())  # then step 1 is learned
    assert (a.output_token_ids, a.num_pending_tokens) == ([106], 1)
    d.finish()
    assert d.outputs["a"] == [106, 107, 108, 109]


def test_a_max_tokens_stop_costs_no_extra_step():
    d = Driver(depth=2, token=counting)
    (a,) = d.add(make_request("a", 3, max_tokens=3))
    d.turn(), d.turn()  # steps 1 and 2 sent; step 1 learned
    d.turn()  # step 3 samples the last token; step 2 learned
    assert a.num_tokens + a.num_pending_tokens == a.max_num_tokens
    assert d.sched.schedule(skip_empty=True) is None  # its last token is on the way
    d.finish()
    assert len(d.plans) == 3 and d.outputs["a"] == [103, 104, 105]
    assert d.discarded() == {"a": 0}


def test_a_stopped_request_costs_one_discarded_token_and_its_blocks_at_once():
    d = Driver(depth=2, token=lambda rid, tokens: EOS if len(tokens) == 5 else 7)
    (a,) = d.add(make_request("a", 4, max_tokens=10))
    d.turn(), d.turn()  # step 1 (prompt, samples 7) and step 2 (samples EOS) sent
    d.turn()  # step 3 sent (samples for a again); step 2 learned: EOS
    assert a.finish_reason == "stop" and len(d.in_flight) == 1
    assert d.pt.num_free_blocks == d.pt.num_blocks  # freed while step 3 is in flight
    assert d.sched._discarded == {"a": 1}
    d.finish()
    assert d.outputs["a"] == [7, EOS] and d.discarded() == {"a": 1}


def test_the_discarded_token_of_an_ended_request_does_not_reach_a_new_one_with_its_id():
    d = Driver(depth=2, token=counting)
    (old,) = d.add(make_request("a", 4, max_tokens=10))
    d.turn()
    d.send(d.sched.schedule(skip_empty=True))  # steps 1 and 2 in flight, both sample for it
    d.sched.abort_request("a")
    assert old.output_token_ids == [] and d.sched._discarded == {"a": 2}
    (again,) = d.add(make_request("a", 2, max_tokens=2))
    d.finish()
    assert d.outputs["a"] == [102, 103] and again.output_token_ids == [102, 103]


def test_the_finished_ids_of_a_step_not_sent_go_with_the_next():
    d = Driver(depth=2, token=counting)
    d.add(make_request("a", 3, max_tokens=1))
    d.add(make_request("b", 3, max_tokens=2))
    d.turn(), d.turn()  # step 1: both prompts; step 2: b's last token; step 1 learned
    assert "a" not in d.sched.requests and len(d.in_flight) == 1
    assert d.sched.schedule(skip_empty=True) is None  # b's last token is on the way
    d.add(make_request("c", 3, max_tokens=1))
    d.finish()
    dropped = [
        (list(p.finished_request_ids), [r.request_id for r in p.new_requests]) for p in d.plans
    ]
    assert (["a"], ["c"]) in dropped  # with c's first step


def test_a_pending_token_is_not_hashed_until_it_is_learned():
    d = Driver(depth=2, block_size=4, token=counting)
    (a,) = d.add(make_request("a", 7, max_tokens=6))
    d.turn()  # step 1: positions 0-6; token 7 pending
    d.turn()  # step 2 computes position 7, filling block 1 with a pending token
    table = d.pt.block_tables["a"]
    assert d.pt.pool.block_hashes[table[1]] is None and a.num_tokens == 8  # now learned
    d.turn()  # step 3's allocation offers it: every token of block 1 is known
    assert d.pt.pool.block_hashes[table[1]] is not None
    assert d.pt.pool.block_hashes[table[2]] is None
    d.finish()


def test_a_request_preempted_with_a_pending_token_waits_for_it_before_it_is_sent_again():
    d = Driver(depth=2, token=counting)
    (a,) = d.add(make_request("a", 4, max_tokens=6))
    d.turn()  # step 1 samples a's first token
    d.sched.preempt(a)  # e.g. by a step planned before that token is learned
    assert a.status is RequestStatus.WAITING and a.num_pending_tokens == 1
    assert d.sched.schedule(skip_empty=True) is None  # not re-admitted yet
    d.turn()  # learns it
    assert a.output_token_ids == [104] and a.num_pending_tokens == 0
    d.turn()
    (new,) = d.plans[-1].new_requests  # sent again with every token it has
    assert list(new.token_ids) == [10, 11, 12, 13, 104]
    d.finish()
    assert d.outputs["a"] == [104, 105, 106, 107, 108, 109] and d.discarded() == {"a": 0}


def test_a_swapped_request_with_a_pending_token_waits_for_it_before_swapping_in():
    d = Driver(depth=2, token=counting, max_tokens=4, host_blocks=8)
    (a,) = d.add(make_request("a", 8, max_tokens=6))
    d.turn(), d.turn()  # two chunks of the prompt, the second sampling
    d.turn()  # step 3 computes that token (pending) and samples; step 2 learned
    d.sched.preempt(a)  # 8 tokens computed, over the budget of 4: swapped
    assert a.status is RequestStatus.SWAPPED and a.num_pending_tokens == 1
    plan = d.sched.schedule(skip_empty=True)  # the swap out, nothing swapped in
    assert plan is not None and plan.swap_out and not plan.swap_in and not scheduled(plan)
    d.send(plan)
    d.finish()
    assert d.outputs["a"] == [108, 109, 110, 111, 112, 113]


def test_the_children_of_a_parent_preempted_before_its_first_token_is_learned_still_run():
    d = Driver(depth=2, token=counting)
    parent, *children = d.add(make_request("p", 5, max_tokens=2, n=3))
    d.turn()  # step 1: the prompt; the first token pending
    d.sched.preempt(parent)  # its blocks are gone when the token comes
    d.finish()
    assert [d.outputs[c.request_id] for c in (parent, *children)] == [[105, 106]] * 3


# -- async == sync ---------------------------------------------------------------------------


def mixed_workload(d: Driver):
    d.add(make_request("greedy", 9, max_tokens=12, ignore_eos=True), stop_seq=())
    d.add(make_request("eos", 5, max_tokens=30))
    d.add(make_request("stop-token", 6, max_tokens=30, stop_token_ids=[STOP_TOKEN]))
    d.add(make_request("n3", 7, max_tokens=8, n=3, ignore_eos=True))
    d.add(make_request("stop-seq", 4, max_tokens=30, ignore_eos=True), stop_seq=(5,))
    d.add(make_request("aborted", 8, max_tokens=30, ignore_eos=True), abort_after=3)
    for i in range(4):
        d.add(make_request(f"more{i}", 10 + i, max_tokens=10))


def test_async_gives_sync_s_tokens_for_a_mix_under_a_tight_cache():
    results = {}
    for depth in (1, 2):
        d = Driver(depth, num_blocks=14, block_size=4, max_tokens=8, max_seqs=6)
        mixed_workload(d)
        d.finish()
        results[depth] = d.result()
        assert d.sched.stats.num_preemptions > 0, "the cache is not tight enough"
        assert all(n <= depth - 1 for n in d.discarded().values())
    assert results[1] == results[2]
    reasons = {reason for _, reason, _ in results[2].values()}
    assert reasons == {"length", "stop", "abort"}


@dataclass
class Spec:
    """One client request of a random workload; arrives `delay` turns after the previous."""

    prompt: list[int]
    max_tokens: int
    n: int
    stop_token: bool
    ignore_eos: bool
    stop_seq: tuple[int, ...]
    abort_after: int | None
    delay: int


specs = st.builds(
    Spec,
    prompt=st.lists(st.sampled_from([1, 3]), min_size=1, max_size=20),
    max_tokens=st.integers(1, 10),
    n=st.integers(1, 3),
    stop_token=st.booleans(),
    ignore_eos=st.booleans(),
    stop_seq=st.sampled_from([(), (5,), (4, 6)]),
    abort_after=st.none() | st.integers(1, 6),
    delay=st.integers(0, 4),
)


class NoDecodeWindows(dict):
    """A page table's decode windows, kept (check_invariants checks them) but never found: every
    allocate, and every running request's plan entry, goes through the general path."""

    def get(self, key, default=None):
        return default


class GeneralUpdate(Scheduler):
    """A scheduler whose update() learns every token through Request.append_token, one lookup
    and one call per id: the general path that Scheduler.update inlines for most tokens."""

    def update(self, request_ids, token_ids):
        learned, tokens, finished = [], [], []
        for rid, token in zip(request_ids, token_ids, strict=True):
            if rid in self._discarded:
                self._discarded[rid] -= 1
                if not self._discarded[rid]:
                    del self._discarded[rid]
                continue
            request = self.requests.get(rid)
            if request is None:
                continue
            request.num_pending_tokens -= 1
            ended = request.append_token(token)
            if rid in self._unforked:
                self._fork(request)
            if ended:
                self._finish(request, request.status)
                finished.append(request)
            learned.append(request)
            tokens.append(token)
        return learned, tokens, finished


def run_workload(
    depth, workload, preempts, policy, caching, host_blocks, windows=True, scheduler=Scheduler
):
    d = Driver(
        depth,
        num_blocks=12,
        block_size=4,
        max_tokens=6,
        max_seqs=4,
        policy=policy,
        caching=caching,
        host_blocks=host_blocks,
        scheduler=scheduler,
    )
    if not windows:
        d.pt.decode_windows = NoDecodeWindows()
    arrivals = deque(workload)
    preempts = dict(preempts)
    turn, wait = 0, arrivals[0].delay if arrivals else 0
    while arrivals or d.busy():
        while arrivals and wait <= 0:
            i, spec = len(workload) - len(arrivals), arrivals.popleft()
            params = {"n": spec.n, "ignore_eos": spec.ignore_eos}
            if spec.stop_token:
                params["stop_token_ids"] = [STOP_TOKEN]
            d.add(
                make_request(f"r{i}", spec.prompt, spec.max_tokens, **params),
                stop_seq=spec.stop_seq,
                # A group of n > 1 is aborted at a point that depends on when its others ran.
                abort_after=spec.abort_after if spec.n == 1 else None,
            )
            wait = arrivals[0].delay if arrivals else 0
        if d.busy():
            # An outside preemption (like a worker lost) at any point, a step in flight or not.
            if turn in preempts and d.sched.running:
                d.sched.preempt(d.sched.running[preempts[turn] % len(d.sched.running)])
            d.turn()
            d.check()
        turn += 1
        wait -= 1
        assert turn < 5000, "the scheduler did not finish its requests"
    d.finish()
    return d


# run_workload's random arguments after depth.
workloads = {
    "workload": st.lists(specs, min_size=1, max_size=8),
    "preempts": st.lists(st.tuples(st.integers(0, 60), st.integers(0, 3)), max_size=4),
    "policy": st.sampled_from(POLICIES),
    "caching": st.booleans(),
    "host_blocks": st.sampled_from([0, 8]),
}


@given(**workloads)
@settings(max_examples=150, deadline=None)
def test_async_gives_sync_s_tokens_for_any_workload(
    workload, preempts, policy, caching, host_blocks
):
    sync = run_workload(1, workload, preempts, policy, caching, host_blocks)
    async_ = run_workload(2, workload, preempts, policy, caching, host_blocks)
    assert async_.result() == sync.result()
    assert all(n == 0 for n in sync.discarded().values())
    for request in async_.completions:  # at most one token sampled in vain, none at a length
        extra = async_.discarded()[request.request_id]
        assert extra <= (0 if request.finish_reason == "length" else 1), request


@pytest.mark.parametrize(
    "general",
    [{"windows": False}, {"scheduler": GeneralUpdate}],
    ids=["steady decodes through allocate", "every token through append_token"],
)
@given(**workloads, depth=st.sampled_from([1, 2]))
@settings(max_examples=100, deadline=None)
def test_the_fast_paths_give_the_general_paths_plans_and_outputs_for_any_workload(
    general, workload, preempts, policy, caching, host_blocks, depth
):
    args = workload, preempts, policy, caching, host_blocks
    fast = run_workload(depth, *args)
    slow = run_workload(depth, *args, **general)
    assert fast.plans == slow.plans
    assert fast.result() == slow.result()
    assert fast.sched.stats == slow.sched.stats
    timed = [[r.first_token_time is None for r in d.completions] for d in (fast, slow)]
    assert timed[0] == timed[1]
