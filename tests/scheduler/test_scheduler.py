"""The policy, driven without workers: the tests play the workers' part (one token per
request whose computed tokens reached its total)."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from scheduler.config import SchedulerConfig
from scheduler.page_table import PageTableManager
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler

EOS = 2


def make_request(rid, prompt_len, max_tokens=4, **params):
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        sampling_params=SamplingParams(temperature=0, max_tokens=max_tokens, **params),
        eos_token_ids=frozenset([EOS]),
        max_model_len=1024,
    )


def run_step(sched, token=7):
    """Schedules a step and answers it like rank 0 would."""
    plan = sched.schedule()
    ids, tokens = [], []
    for r in (*plan.new_requests, *plan.cached_requests):
        req = sched.requests[r.request_id]
        if req.num_computed_tokens == req.num_tokens:
            ids.append(r.request_id)
            tokens.append(token)
    sched.update(ids, tokens)
    return plan


def scheduled(plan):
    out = {r.request_id: r.num_scheduled_tokens for r in plan.new_requests}
    out.update({r.request_id: r.num_scheduled_tokens for r in plan.cached_requests})
    return out


def new_scheduler(num_blocks=64, block_size=4, max_tokens=64, max_seqs=8):
    pt = PageTableManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_seqs, max_tokens), pt), pt


def test_plan_is_a_diff():
    sched, _ = new_scheduler()
    sched.add_request(make_request("a", 6, max_tokens=8))
    first = run_step(sched)
    assert [r.request_id for r in first.new_requests] == ["a"]
    assert list(first.new_requests[0].token_ids) == list(range(10, 16))
    second = run_step(sched)
    assert not second.new_requests
    (cached,) = second.cached_requests
    assert (cached.num_computed_tokens, cached.num_scheduled_tokens) == (6, 1)
    assert list(cached.new_block_ids) == []  # position 6 is still in block 1
    run_step(sched)  # position 7
    fourth = run_step(sched)
    assert len(fourth.cached_requests[0].new_block_ids) == 1  # position 8 opens block 2


def test_new_requests_join_running_ones_and_finished_ones_are_dropped():
    sched, pt = new_scheduler()
    sched.add_request(make_request("a", 3, max_tokens=4))
    run_step(sched)
    sched.add_request(make_request("b", 5, max_tokens=1))
    plan = run_step(sched)
    assert scheduled(plan) == {"a": 1, "b": 5}
    assert "b" not in sched.requests  # max_tokens=1: finished after its prefill
    plan = run_step(sched)
    assert list(plan.finished_request_ids) == ["b"]
    run_step(sched)
    assert not sched.has_work()  # a: 4 tokens
    assert pt.num_free_blocks == pt.num_blocks


def test_chunked_prefill_spends_the_budget_after_decodes():
    sched, _ = new_scheduler(max_tokens=8)
    sched.add_request(make_request("a", 2, max_tokens=10))
    run_step(sched)
    sched.add_request(make_request("long", 20, max_tokens=2))
    plans = [run_step(sched) for _ in range(3)]
    assert [scheduled(p) for p in plans] == [
        {"a": 1, "long": 7},
        {"a": 1, "long": 7},
        {"a": 1, "long": 6},
    ]
    assert sched.requests["long"].output_token_ids == [7]  # sampled only after the last chunk


def test_preemption_recomputes_the_latest_request():
    sched, pt = new_scheduler(num_blocks=4, block_size=4)
    sched.add_request(make_request("a", 4, max_tokens=8))
    sched.add_request(make_request("b", 4, max_tokens=8))
    run_step(sched)  # a: blocks 0, b: block 1 ... both prefilled
    for _ in range(5):
        run_step(sched)
    assert sched.num_preemptions >= 1
    assert sched.requests["b"].num_preemptions >= 1 or "b" not in sched.requests
    while sched.has_work():
        plan = run_step(sched)
        for new in plan.new_requests:  # a resumed request brings every token it had
            req = sched.requests.get(new.request_id)
            if req is not None and req.output_token_ids:
                assert len(new.token_ids) >= req.num_prompt_tokens
    pt.check_invariants()
    assert pt.num_free_blocks == pt.num_blocks


def test_eos_and_stop_token_ids_finish():
    sched, _ = new_scheduler()
    sched.add_request(make_request("a", 3, max_tokens=10))
    sched.add_request(make_request("b", 3, max_tokens=10, stop_token_ids=[9]))
    sched.add_request(make_request("c", 3, max_tokens=2, ignore_eos=True))
    run_step(sched, token=EOS)
    assert "a" not in sched.requests  # eos
    assert "c" in sched.requests  # ignores eos
    run_step(sched, token=9)
    assert "b" not in sched.requests and "c" not in sched.requests


class SchedulerMachine(RuleBasedStateMachine):
    """Random add / step / abort under a tight cache: the page table stays consistent, every
    request ends, and nothing leaks."""

    def __init__(self):
        super().__init__()
        self.sched, self.pt = new_scheduler(num_blocks=10, block_size=4, max_tokens=12, max_seqs=4)
        self.next_id = 0
        self.ended: dict[str, Request] = {}

    @rule(prompt_len=st.integers(1, 20), max_tokens=st.integers(1, 12))
    def add(self, prompt_len, max_tokens):
        req = make_request(f"r{self.next_id}", prompt_len, max_tokens=max_tokens, ignore_eos=True)
        self.next_id += 1
        self.sched.add_request(req)
        self.ended[req.request_id] = req

    @precondition(lambda self: self.sched.has_work())
    @rule()
    def step(self):
        plan = run_step(self.sched)
        for rid, n in scheduled(plan).items():
            assert n >= 1
            assert rid in self.sched.requests or self.ended[rid].status.finished

    @precondition(lambda self: self.sched.requests)
    @rule(data=st.data())
    def abort(self, data):
        rid = data.draw(st.sampled_from(sorted(self.sched.requests)))
        assert self.sched.abort_request(rid).status is RequestStatus.FINISHED_ABORTED

    @invariant()
    def consistent(self):
        self.pt.check_invariants()
        tables = set(self.pt.block_tables)
        assert tables <= set(self.sched.requests)
        for req in self.sched.running:
            assert req.request_id in tables

    def teardown(self):
        for _ in range(500):
            if not self.sched.has_work():
                break
            run_step(self.sched)
        assert not self.sched.has_work()
        assert all(r.status.finished for r in self.ended.values())
        for r in self.ended.values():
            if r.status is RequestStatus.FINISHED_LENGTH:
                assert len(r.output_token_ids) == r.sampling_params.max_tokens
        assert self.pt.num_free_blocks == self.pt.num_blocks


TestScheduler = SchedulerMachine.TestCase
TestScheduler.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
