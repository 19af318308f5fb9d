"""The engine loop against a fake rank over real gRPC: token outputs batched per sink and step,
ends, n > 1, aborts and stops that land while a step is in flight; async scheduling (two steps
in flight) against synchronous. No model, no tokenizer, no torch."""

import contextlib
import queue
import re
import threading
import time
import zlib
from dataclasses import dataclass, field

import grpc
import pytest

from protos import frontend_pb2
from scheduler.config import SchedulerConfig
from scheduler.core.engine import Engine
from scheduler.core.page_table import PageTableManager
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler
from scheduler.core.worker_client import WorkerClient
from scheduler.sampling_params import SamplingParams
from tests.scheduler.fake_worker import TIMEOUT, FakeRank, serving


def hashed(tokens: list[int]) -> int:
    """A token from all of the request's tokens, 0 (EOS) to 9."""
    return zlib.crc32(bytes(tokens)) % 10


class Sink:
    """A frontend as the engine sees it: the messages it was sent, in order."""

    def __init__(self) -> None:
        self.messages: queue.Queue[frontend_pb2.StepOutputs] = queue.Queue()

    def send(self, outputs: frontend_pb2.StepOutputs) -> None:
        self.messages.put(outputs)


@dataclass
class Completion:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    end: frontend_pb2.Finished | None = None


def apply(message: frontend_pb2.StepOutputs, request_id: str, got: dict[int, Completion]):
    """Adds what one message holds for the request to got (completion index -> Completion)."""
    lps = message.logprobs
    for i, (rid, index, token) in enumerate(
        zip(message.request_ids, message.indices, message.token_ids, strict=True)
    ):
        if rid == request_id:
            completion = got.setdefault(index, Completion())
            assert completion.end is None, "a token after the completion's end"
            completion.tokens.append(token)
            if lps and lps[i].entries:
                completion.logprobs.append(lps[i].entries[0].logprob)
    for end in message.finished:
        if end.request_id == request_id:
            got.setdefault(end.index, Completion()).end = end


def collect(sink: Sink, request_id: str, n: int = 1, got=None) -> dict[int, Completion]:
    """Completion index -> what the sink got for it, up to the n-th end of the request."""
    got = got if got is not None else {}
    while sum(c.end is not None for c in got.values()) < n:
        apply(sink.messages.get(timeout=TIMEOUT), request_id, got)
    return got


def collect_tokens(sink: Sink, request_id: str, index: int, count: int, got) -> None:
    """Reads messages until completion `index` has `count` tokens."""
    while len(got.get(index, Completion()).tokens) < count:
        apply(sink.messages.get(timeout=TIMEOUT), request_id, got)


@contextlib.contextmanager
def serve(rank: FakeRank, async_scheduling=True, max_num_batched_tokens=64, step_timeout_s=120.0):
    """An engine over the rank, its page table as large as the rank's cache."""
    config = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=max_num_batched_tokens,
        async_scheduling=async_scheduling,
        step_timeout_s=step_timeout_s,
    )
    page_table = PageTableManager(
        len(rank.worker.device), rank.worker.block_size, True, len(rank.worker.host)
    )
    with serving(rank) as address:
        worker = WorkerClient(address)
        engine = Engine(Scheduler(config, page_table), [worker])
        try:
            yield engine
        finally:
            engine.stop()
            worker.close()


@pytest.fixture
def rank():
    return FakeRank()


@pytest.fixture
def engine(rank):
    with serve(rank) as engine:
        yield engine


def submit(engine: Engine, rid: str, prompt=(1,), sink: Sink | None = None, **params) -> Sink:
    sink = sink or Sink()
    request = Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(temperature=0, **params),
        eos_token_ids=frozenset([0]),
        max_model_len=64,
    )
    engine.add_request(request, sink)
    return sink


def test_outputs_carry_tokens_and_the_end_its_reason_and_usage(engine):
    [got] = collect(submit(engine, "a", prompt=(1, 1), max_tokens=4), "a").values()
    assert got.tokens == [2, 3, 4, 5]
    assert got.end.finish_reason == "length"
    usage = got.end.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 4)
    assert 0 <= got.end.timings.time_to_first_token_ms <= got.end.timings.total_ms


def test_a_sink_gets_one_message_a_step_holding_all_its_requests(engine):
    sink = Sink()
    with engine.lock:  # both in the first step, so in every step
        submit(engine, "a", sink=sink, max_tokens=3)
        submit(engine, "b", prompt=(5,), sink=sink, max_tokens=3)
    messages = [sink.messages.get(timeout=TIMEOUT) for _ in range(3)]
    assert [list(m.request_ids) for m in messages] == [["a", "b"]] * 3
    assert [list(m.token_ids) for m in messages] == [[2, 6], [3, 7], [4, 8]]
    assert [e.request_id for e in messages[-1].finished] == ["a", "b"]
    assert sink.messages.empty()


def test_n_completions_finishing_in_one_step_each_get_their_end(engine):
    got = collect(submit(engine, "a", max_tokens=3, n=3), "a", n=3)
    assert sorted(got) == [0, 1, 2]
    assert all(c.tokens == [2, 3, 4] and c.end.finish_reason == "length" for c in got.values())


def test_logprobs_come_with_their_tokens(engine, rank):
    rank.logprobs = True
    [got] = collect(submit(engine, "a", max_tokens=3, logprobs=0), "a").values()
    assert got.logprobs == [pytest.approx(-t / 10) for t in got.tokens]


def test_an_abort_during_a_step_ends_the_request_at_once_and_drops_the_step_s_token(engine, rank):
    sink = submit(engine, "a", max_tokens=50)
    assert list(sink.messages.get(timeout=TIMEOUT).token_ids) == [2]  # the prefill's token
    rank.hold = True
    assert rank.held.wait(TIMEOUT)  # a decode step is in flight, held by the rank
    assert engine.abort("a")  # answered now, while the step is still held
    got = collect(sink, "a")
    assert got[0].end.finish_reason == "abort"
    rank.release.set()
    with pytest.raises(queue.Empty):  # nothing after the end
        sink.messages.get(timeout=0.5)
    with engine.lock:
        assert not engine.scheduler.requests
    assert not engine.abort("a")


def test_an_abort_before_a_learned_step_s_outputs_went_out_sends_them_first(engine):
    """The engine sends the next plan before the outputs of the step it just learned: an abort
    landing in between gets the learned tokens out first, then the end, nothing after it."""
    sending, resume = threading.Event(), threading.Event()
    send = engine._send

    def held_send(plan, num_waiting):  # the engine thread, outputs of a learned step unsent
        if engine._unsent is not None and not sending.is_set():
            sending.set()
            assert resume.wait(TIMEOUT)
        send(plan, num_waiting)

    engine._send = held_send
    sink = submit(engine, "a", max_tokens=50)
    assert sending.wait(TIMEOUT)
    with engine.lock:
        learned = len(engine.scheduler.requests["a"].output_token_ids)
    assert engine.abort("a")
    resume.set()
    got = collect(sink, "a")  # apply() fails on a token after the end
    assert got[0].end.finish_reason == "abort"
    assert len(got[0].tokens) == learned  # every learned token, the unsent step's included
    with pytest.raises(queue.Empty):
        sink.messages.get(timeout=0.5)


def test_a_stopped_completion_ends_with_its_stop_string_and_the_others_go_on(engine):
    sink = submit(engine, "a", max_tokens=6, n=2)
    got: dict[int, Completion] = {}
    collect_tokens(sink, "a", 1, 2, got)
    assert engine.stop_completion("a", 1, "t on")
    collect(sink, "a", n=2, got=got)
    assert (got[1].end.finish_reason, got[1].end.stop_str) == ("stop", "t on")
    assert got[0].end.finish_reason == "length" and len(got[0].tokens) == 6
    assert not engine.stop_completion("a", 1, "t on")


def test_abort_all_ends_one_sink_s_requests_only(engine, rank):
    gone, other = Sink(), Sink()
    for rid in ("a", "b"):
        submit(engine, rid, sink=gone, max_tokens=50)
    submit(engine, "c", sink=other, max_tokens=8)
    assert engine.abort_all(gone) == 2
    assert engine.num_unfinished(gone) == 0
    [got] = collect(other, "c").values()
    assert got.end.finish_reason == "length" and len(got.tokens) == 8


# -- async scheduling against synchronous -----------------------------------------------------

# (request id, prompt, params): async and sync scheduling must answer these alike. The rank's
# token is hashed(tokens so far), so a completion's tokens depend on nothing else.
MIX = [
    ("greedy", [1, 2, 3, 4, 5, 6, 7], dict(max_tokens=20, ignore_eos=True)),
    ("eos", [2, 3, 4, 5, 6, 7, 8], dict(max_tokens=30)),
    ("stop-token", [3, 1, 4, 1, 5, 9, 2], dict(max_tokens=30, stop_token_ids=[5], ignore_eos=True)),
    ("n3", [4, 4, 4, 4, 4, 4], dict(max_tokens=10, n=3, ignore_eos=True)),
    ("short", [6, 7, 8, 9, 1, 2, 3, 4], dict(max_tokens=16)),
    ("victim", [7, 7, 8, 8, 9, 9], dict(max_tokens=40, ignore_eos=True)),  # aborted
    *[(f"long{i}", [i + 1] * 12, dict(max_tokens=24, ignore_eos=True)) for i in range(3)],
]


def greedy_tokens(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(hashed(tokens))
    return tokens[len(prompt) :]


def run_mix(async_scheduling: bool, num_blocks: int, num_host_blocks: int, budget: int):
    """Every completion of MIX as its sink saw it (tokens, reason, stop token, completion
    tokens), the victim aborted after its second token; the tokens the rank sampled for each
    completion but the sink never got; preemptions."""
    rank = FakeRank(num_blocks, num_host_blocks, token=hashed)
    with serve(rank, async_scheduling, budget) as engine:
        sinks = {rid: submit(engine, rid, prompt, **params) for rid, prompt, params in MIX}
        victim: dict[int, Completion] = {}
        collect_tokens(sinks["victim"], "victim", 0, 2, victim)
        engine.abort("victim")  # steps that sample for it are in flight
        completions = {}
        for rid, _, params in MIX:
            got = collect(sinks[rid], rid, params.get("n", 1), victim if rid == "victim" else None)
            for index, c in got.items():
                completions[rid if index == 0 else f"{rid}#{index}"] = (
                    c.tokens,
                    c.end.finish_reason,
                    c.end.stop_token_id if c.end.HasField("stop_token_id") else None,
                    c.end.usage.completion_tokens,
                )
        with engine.lock:
            num_preemptions = engine.scheduler.stats.num_preemptions
            assert not engine.scheduler.requests and not engine.scheduler._discarded
    discarded = {cid: rank.sampled[cid] - len(c[0]) for cid, c in completions.items()}
    return completions, discarded, num_preemptions


@pytest.mark.parametrize(
    "num_blocks,num_host_blocks,budget",
    [(64, 0, 64), (16, 0, 64), (16, 16, 16)],
    ids=["roomy", "recompute", "swap"],
)
def test_async_scheduling_answers_what_sync_scheduling_answers(num_blocks, num_host_blocks, budget):
    sync, sync_discarded, sync_preemptions = run_mix(False, num_blocks, num_host_blocks, budget)
    got, discarded, preemptions = run_mix(True, num_blocks, num_host_blocks, budget)
    if num_blocks < 64:
        assert sync_preemptions > 0 and preemptions > 0, "the cache is not tight enough"
    victim, victim_sync = got.pop("victim"), sync.pop("victim")
    assert got == sync
    reasons = {(c[1], c[2]) for c in got.values()}
    assert reasons == {("length", None), ("stop", None), ("stop", 5)}
    assert all(len(c[0]) == c[3] for c in got.values())
    # The victim got a prefix of its tokens (how long depends on when the abort landed).
    for tokens, reason, _, num in (victim, victim_sync):
        assert reason == "abort" and len(tokens) == num >= 2
        assert tokens == greedy_tokens(MIX[5][1], len(tokens))
    # A stopped completion cost at most one token sampled in vain, one ended by its length
    # none; synchronous scheduling never samples in vain but for an abort.
    assert all(n == 0 for cid, n in sync_discarded.items() if cid != "victim")
    for cid, (_, reason, _, _) in got.items():
        assert discarded[cid] == 0 if reason == "length" else discarded[cid] <= 1, cid
    assert any(discarded[cid] == 1 for cid in got), "no plan went ahead of a result"
    assert discarded["victim"] <= 2 and sync_discarded["victim"] <= 1


class LookaheadRank(FakeRank):
    """Holds each step's result until the next plan has come, or wait_s has passed (counted
    in results_alone); logs when each plan came and each result left."""

    def __init__(self, wait_s: float) -> None:
        super().__init__()
        self.wait_s = wait_s
        self.events: list[tuple[str, int]] = []
        self.results_alone = 0

    def Execute(self, request_iterator, context):
        plans: queue.Queue = queue.Queue()
        end = object()

        def receive():
            try:
                for plan in request_iterator:
                    self.events.append(("plan", plan.step_id))
                    plans.put(plan)
            except grpc.RpcError:
                pass  # the server stopped under the stream
            finally:
                plans.put(end)

        threading.Thread(target=receive, daemon=True).start()
        following = plans.get()
        while following is not end:
            plan = following
            result = self.answer(plan)
            try:
                following = plans.get(timeout=self.wait_s)
            except queue.Empty:
                following = None
                self.results_alone += 1
            self.events.append(("result", plan.step_id))
            yield result
            if following is None:
                following = plans.get()


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
def test_with_async_scheduling_plan_n_plus_1_goes_before_result_n(async_scheduling):
    rank = LookaheadRank(wait_s=0.5)
    with serve(rank, async_scheduling) as engine:
        [got] = collect(submit(engine, "a", max_tokens=6), "a").values()
        records = list(engine.step_records)
    assert got.tokens == [2, 3, 4, 5, 6, 7]
    # Six steps, the first the prompt's: the sixth token's step is the last (no extra step).
    plans = [step for event, step in rank.events if event == "plan"]
    assert plans == [1, 2, 3, 4, 5, 6]
    assert [r.scheduled for r in records] == [{"a": 1}] * 6
    for n in range(1, 6):
        ahead = rank.events.index(("plan", n + 1)) < rank.events.index(("result", n))
        assert ahead == async_scheduling, (n, rank.events)
    # Async: only the last result found no plan after it; sync: none did.
    assert rank.results_alone == (1 if async_scheduling else 6)


def test_the_first_step_after_the_engine_idled_has_no_turnaround():
    """A plan sent after the engine waited for work follows no learned step: the time it
    idled is not its turnaround (bench's anatomy sums the worker idle of busy steps by it)."""
    with serve(FakeRank()) as engine:
        collect(submit(engine, "a", max_tokens=3), "a")
        time.sleep(0.3)  # the engine idles: nothing in flight, no work
        collect(submit(engine, "b", max_tokens=3), "b")
        records = list(engine.step_records)
    first_of_b = next(r for r in records if "b" in r.scheduled)
    assert first_of_b.turnaround_ms == 0.0
    assert any(r.turnaround_ms > 0 for r in records)  # steps sent right after a learned one


class FailingRank(FakeRank):
    """Fails its stream when plan `fail_at` comes (steps after it may be in flight)."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at

    def Execute(self, request_iterator, context):
        for plan in request_iterator:
            if plan.step_id == self.fail_at:
                raise RuntimeError("the device is lost")
            yield self.answer(plan)


def test_a_rank_failing_with_steps_in_flight_leaves_no_request_unanswered():
    with serve(FailingRank(fail_at=4)) as engine:
        sinks = [submit(engine, f"r{i}", max_tokens=20) for i in range(3)]
        ends = [collect(sink, f"r{i}")[0].end for i, sink in enumerate(sinks)]
        assert all(e.finish_reason == "abort" and e.error.message for e in ends)
        assert {e.error.code for e in ends} == {grpc.StatusCode.UNAVAILABLE.value[0]}
        with pytest.raises(RuntimeError, match="the engine has failed"):
            submit(engine, "late")
        with engine.lock:
            assert not engine.scheduler.requests


def test_throughput_counts_every_token_of_the_window_beyond_the_records_kept():
    rank = FakeRank()
    page_table = PageTableManager(len(rank.worker.device), rank.worker.block_size, True)
    with serving(rank) as address:
        worker = WorkerClient(address)
        engine = Engine(
            Scheduler(SchedulerConfig(max_num_seqs=8).for_device(gpu=False), page_table),
            [worker],
            4,
        )
        try:
            [got] = collect(submit(engine, "a", max_tokens=20, ignore_eos=True), "a").values()
            assert len(got.tokens) == 20
            assert len(engine.step_records) == 4  # the last 4 steps only
            assert engine.generated_tokens_per_s(10.0) == pytest.approx(20 / 10.0)
        finally:
            engine.stop()
            worker.close()


def test_a_step_that_hangs_past_step_timeout_s_fails_the_engine_naming_rank_step_and_seconds():
    rank = FakeRank()
    rank.hold = True  # the rank's process lives and answers pings, but its step never ends
    try:
        with serve(rank, step_timeout_s=0.5) as engine:
            # Before the step is sent, so that `waited` is never short of the step's own wait
            # (measured from when this thread saw the rank hold, a loaded machine made it so).
            start = time.monotonic()
            sink = submit(engine, "r", max_tokens=4)
            assert rank.held.wait(TIMEOUT)
            end = collect(sink, "r")[0].end
            waited = time.monotonic() - start
            assert end.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert re.fullmatch(
                r"step 1 hangs: worker rank 0 \(127\.0\.0\.1:\d+\) sent no result in "
                r"\d+\.\d s \(scheduler\.step_timeout_s=0\.5\)",
                end.error.message,
            ), end.error.message
            assert 0.5 <= waited < 0.5 + TIMEOUT / 2
            assert engine.error == end.error.message
    finally:
        rank.release.set()


class SlowRank(FakeRank):
    """Takes `seconds` over each step, one step at a time, as a device does."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def Execute(self, request_iterator, context):
        for plan in request_iterator:
            time.sleep(self.seconds)
            yield self.answer(plan)


def test_the_watchdog_charges_a_step_neither_the_step_queued_before_it_nor_idle_time():
    timeout, step_s = 0.8, 0.5
    with serve(SlowRank(step_s), step_timeout_s=timeout) as engine:
        sinks = [submit(engine, f"r{i}", prompt=(i + 1,), max_tokens=3) for i in range(4)]
        for i, sink in enumerate(sinks):
            assert collect(sink, f"r{i}")[0].end.finish_reason == "length"
        # With two steps in flight, a step's result comes two step times after its plan was
        # sent: past the bound, yet no step took longer than step_s.
        assert max(r.duration_ms for r in engine.step_records) > timeout * 1e3
        time.sleep(2 * timeout)  # idle past the bound: the condition under test
        sink = submit(engine, "after", max_tokens=1)
        assert collect(sink, "after")[0].end.finish_reason == "length"
        assert engine.error is None


def test_the_engine_counts_its_steps_those_in_graphs_and_their_time(rank):
    rank.graphs = True  # its steps of decodes alone say they replayed a graph
    with serve(rank) as engine:
        collect(submit(engine, "a", prompt=(1, 1), max_tokens=6), "a")
        with engine.lock:
            records = list(engine.step_records)
            counts = engine.num_steps, engine.num_graph_steps, engine.step_seconds
            pieces = engine.num_piecewise_steps
    assert counts[0] == len(records) >= 6
    assert counts[1] == sum(r.cuda_graph for r in records) == counts[0] - 1  # all but the prompt's
    assert pieces == sum(r.piecewise_graph for r in records) == 1  # the prompt's
    assert counts[2] == pytest.approx(sum(r.interval_ms for r in records) / 1e3)
