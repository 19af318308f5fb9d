"""The engine loop against a fake rank over real gRPC: token deltas, stop strings, n > 1, and
aborts that land while a step is in flight; async scheduling (two steps in flight) against
synchronous. No model, no torch."""

import contextlib
import queue
import threading
import zlib
from collections import Counter
from concurrent import futures

import grpc
import pytest

from protos import worker_pb2, worker_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.engine import Delta, Engine
from scheduler.page_table import PageTableManager
from scheduler.request import Request
from scheduler.sampling_params import RequestOutputKind, SamplingParams
from scheduler.scheduler import Scheduler
from tests.scheduler.fake_worker import FakeWorker

PIECES = ["<eos>", " the", " cat", " sat", " on", " a", " mat", ".", "\n", "\n"]
TIMEOUT = 10


class PieceTokenizer:
    eos_token_ids = frozenset([0])

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in token_ids)

    def decode_batch(self, sequences: list[list[int]], skip_special_tokens: bool = True):
        return [self.decode(ids, skip_special_tokens) for ids in sequences]


def successor(tokens: list[int]) -> int:
    """The token after the request's last one: 1, 2, 3, ..., 9, 1, ... (never EOS)."""
    return tokens[-1] % 9 + 1


def hashed(tokens: list[int]) -> int:
    """A token from all of the request's tokens, 0 (EOS) to 9."""
    return zlib.crc32(bytes(tokens)) % 10


class FakeRank(worker_pb2_grpc.WorkerServicer):
    """Answers each plan like rank 0: each request that samples gets token(its tokens so far),
    counted in `sampled`. With `hold` set, the next step waits for `release` (and sets `held`
    first). With `logprobs` set, every token comes with logprob -token / 10 and rank 1 (no
    top k)."""

    def __init__(self, num_blocks=64, num_host_blocks=0, token=successor) -> None:
        self.worker = FakeWorker(num_blocks, 4, num_host_blocks)
        self.token = token
        self.sampled: Counter[str] = Counter()  # completion id -> tokens sampled for it
        self.hold = False
        self.logprobs = False
        self.held = threading.Event()
        self.release = threading.Event()

    def Execute(self, request_iterator, context):
        for plan in request_iterator:
            if self.hold:
                self.held.set()
                assert self.release.wait(TIMEOUT)
            yield self.answer(plan)

    def answer(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        ids = self.worker.execute(plan)
        tokens = [self.token(self.worker.tokens[rid]) for rid in ids]
        for rid, token in zip(ids, tokens, strict=True):
            self.worker.learn(rid, token)
            self.sampled[rid] += 1
        result = worker_pb2.StepResult(step_id=plan.step_id, request_ids=ids, token_ids=tokens)
        if self.logprobs:
            result.sampled_logprobs.extend(-t / 10 for t in tokens)
            result.sampled_ranks.extend([1] * len(tokens))
            result.num_top_logprobs.extend([0] * len(tokens))
        return result


@contextlib.contextmanager
def serve(rank: FakeRank, async_scheduling=True, max_num_batched_tokens=64):
    """An engine over the rank, its page table as large as the rank's cache."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServicer_to_server(rank, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    config = SchedulerConfig(
        max_num_seqs=8,
        max_num_batched_tokens=max_num_batched_tokens,
        async_scheduling=async_scheduling,
    )
    page_table = PageTableManager(
        len(rank.worker.device), rank.worker.block_size, True, len(rank.worker.host)
    )
    engine = Engine(Scheduler(config, page_table), PieceTokenizer(), [f"127.0.0.1:{port}"])
    try:
        yield engine
    finally:
        engine.stop()
        server.stop(grace=None)


@pytest.fixture
def rank():
    return FakeRank()


@pytest.fixture
def engine(rank):
    with serve(rank) as engine:
        yield engine


def submit(engine: Engine, rid: str, prompt=(1,), **params) -> "queue.Queue[Delta]":
    deltas: queue.Queue[Delta] = queue.Queue()
    request = Request(
        request_id=rid,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(temperature=0, **params),
        eos_token_ids=frozenset([0]),
        max_model_len=64,
    )
    engine.add_request(request, deltas.put)
    return deltas


def until_final(deltas: "queue.Queue[Delta]", n: int = 1) -> list[Delta]:
    """Every delta up to the n-th final one."""
    got = []
    while n:
        got.append(deltas.get(timeout=TIMEOUT))
        n -= got[-1].finish_reason is not None
    return got


def test_deltas_carry_tokens_and_text_and_the_last_one_the_reason(engine):
    got = until_final(submit(engine, "a", max_tokens=4))
    assert [t for d in got for t in d.token_ids] == [2, 3, 4, 5]
    assert "".join(d.text for d in got) == " cat sat on a"
    assert got[-1].finish_reason == "length" and got[-1].num_output_tokens == 4


def test_a_stop_string_across_tokens_ends_the_request_and_frees_it(engine):
    got = until_final(submit(engine, "a", max_tokens=20, stop=["t on"]))
    assert [t for d in got for t in d.token_ids] == [2, 3, 4]  # " cat", " sat", " on"
    assert "".join(d.text for d in got) == " cat sa"
    assert (got[-1].finish_reason, got[-1].stop_reason) == ("stop", "t on")
    with engine.lock:
        assert not engine.scheduler.requests and not engine.scheduler.has_work()


def test_n_completions_finishing_in_one_step_each_get_their_last_delta(engine):
    got = until_final(submit(engine, "a", max_tokens=3, n=3), n=3)
    finals = sorted(d.index for d in got if d.finish_reason is not None)
    assert finals == [0, 1, 2]


def test_an_abort_during_a_step_is_answered_last_at_the_step_s_end(engine, rank):
    deltas = submit(engine, "a", max_tokens=50)
    assert deltas.get(timeout=TIMEOUT).token_ids == [2]  # the prefill step's token
    rank.hold = True
    assert rank.held.wait(TIMEOUT)  # a decode step is in flight, held by the rank
    with engine.lock:
        assert engine._in_step
    assert engine.abort("a")
    rank.release.set()
    got = until_final(deltas)
    assert got[-1].finish_reason == "abort"
    assert all(d.finish_reason is None for d in got[:-1])
    with pytest.raises(queue.Empty):  # nothing after the final delta
        deltas.get(timeout=0.5)


FINAL_ONLY = RequestOutputKind.FINAL_ONLY


def test_final_only_is_one_delta_holding_what_the_streamed_deltas_hold(engine, rank):
    rank.logprobs = True
    streamed = until_final(submit(engine, "a", max_tokens=4, logprobs=0))
    [final] = until_final(submit(engine, "b", max_tokens=4, logprobs=0, output_kind=FINAL_ONLY))
    assert final.token_ids == [t for d in streamed for t in d.token_ids] == [2, 3, 4, 5]
    assert final.text == "".join(d.text for d in streamed) == " cat sat on a"
    assert final.logprobs == [p for d in streamed for p in d.logprobs]
    assert [p[t].logprob for p, t in zip(final.logprobs, final.token_ids, strict=True)] == [
        pytest.approx(-t / 10) for t in final.token_ids
    ]
    assert final.logprobs[0][2].decoded_token == " cat"
    assert final.cumulative_logprob == pytest.approx(streamed[-1].cumulative_logprob)
    assert (final.finish_reason, final.num_output_tokens) == ("length", 4)


def test_final_only_with_a_stop_string_and_n_completions(engine):
    got = until_final(
        submit(engine, "a", max_tokens=20, stop=["t on"], n=2, output_kind=FINAL_ONLY), n=2
    )
    assert sorted(d.index for d in got) == [0, 1]
    for d in got:
        assert (d.token_ids, d.text, d.stop_reason) == ([2, 3, 4], " cat sa", "t on")


def test_an_aborted_final_only_request_gets_every_token_it_generated(engine, rank):
    deltas = submit(engine, "a", max_tokens=50, output_kind=FINAL_ONLY)
    rank.hold = True
    assert rank.held.wait(TIMEOUT)  # a step is in flight; nothing was sent yet
    assert deltas.empty()
    assert engine.abort("a")
    rank.release.set()
    [final] = until_final(deltas)
    assert final.finish_reason == "abort"
    assert final.token_ids == [2, 3, 4, 5, 6, 7, 8, 9, 1, 2][: len(final.token_ids)]
    assert final.text == "".join(PIECES[t] for t in final.token_ids)


# -- async scheduling against synchronous -----------------------------------------------------

# (request id, prompt, params): async and sync scheduling must answer these alike. The rank's
# token is hashed(tokens so far), so a completion's tokens depend on nothing else.
MIX = [
    ("greedy", [1, 2, 3, 4, 5, 6, 7], dict(max_tokens=20, ignore_eos=True)),
    ("eos", [2, 3, 4, 5, 6, 7, 8], dict(max_tokens=30)),
    ("stop-token", [3, 1, 4, 1, 5, 9, 2], dict(max_tokens=30, stop_token_ids=[5], ignore_eos=True)),
    ("n3", [4, 4, 4, 4, 4, 4], dict(max_tokens=10, n=3, ignore_eos=True)),
    ("stop-string", [5, 6, 5, 6, 5, 6], dict(max_tokens=30, stop=["e\n m"], ignore_eos=True)),
    ("final-only", [6, 7, 8, 9, 1, 2, 3, 4], dict(max_tokens=16, output_kind=FINAL_ONLY)),
    ("victim", [7, 7, 8, 8, 9, 9], dict(max_tokens=40, ignore_eos=True)),  # aborted
    *[(f"long{i}", [i + 1] * 12, dict(max_tokens=24, ignore_eos=True)) for i in range(3)],
]


def greedy_tokens(prompt: list[int], count: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(count):
        tokens.append(hashed(tokens))
    return tokens[len(prompt) :]


def run_mix(async_scheduling: bool, num_blocks: int, num_host_blocks: int, budget: int):
    """Every completion of MIX as the client saw it, the victim aborted after its second delta;
    the tokens the rank sampled for each completion but the client never got; preemptions."""
    rank = FakeRank(num_blocks, num_host_blocks, token=hashed)
    with serve(rank, async_scheduling, budget) as engine:
        queues = {rid: submit(engine, rid, prompt, **params) for rid, prompt, params in MIX}
        first = [queues["victim"].get(timeout=TIMEOUT) for _ in range(2)]
        engine.abort("victim")  # steps that sample for it are in flight
        completions = {}
        for rid, _, params in MIX:
            deltas = until_final(queues[rid], params.get("n", 1))
            if rid == "victim":
                deltas = first + deltas
            for index in range(params.get("n", 1)):
                mine = [d for d in deltas if d.index == index]
                completions[rid if index == 0 else f"{rid}#{index}"] = (
                    [t for d in mine for t in d.token_ids],
                    "".join(d.text for d in mine),
                    mine[-1].finish_reason,
                    mine[-1].stop_reason,
                    mine[-1].num_output_tokens,
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
    reasons = {(c[2], c[3]) for c in got.values()}
    assert reasons == {("length", None), ("stop", None), ("stop", 5), ("stop", "e\n m")}
    # The victim got a prefix of its tokens (how long depends on when the abort landed).
    for tokens, text, reason, _, num in (victim, victim_sync):
        assert reason == "abort" and len(tokens) == num >= 2
        assert tokens == greedy_tokens(MIX[6][1], len(tokens))
        assert text == "".join(PIECES[t] for t in tokens)
    # A stopped completion cost at most one token sampled in vain, one ended by its length
    # none; synchronous scheduling never samples in vain but for an abort.
    assert all(n == 0 for cid, n in sync_discarded.items() if cid != "victim")
    for cid, (_, _, reason, _, _) in got.items():
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
        got = until_final(submit(engine, "a", max_tokens=6))
        records = list(engine.step_records)
    assert [t for d in got for t in d.token_ids] == [2, 3, 4, 5, 6, 7]
    # Six steps, the first the prompt's: the sixth token's step is the last (no extra step).
    plans = [step for event, step in rank.events if event == "plan"]
    assert plans == [1, 2, 3, 4, 5, 6]
    assert [r.scheduled for r in records] == [{"a": 1}] * 6
    for n in range(1, 6):
        ahead = rank.events.index(("plan", n + 1)) < rank.events.index(("result", n))
        assert ahead == async_scheduling, (n, rank.events)
    # Async: only the last result found no plan after it; sync: none did.
    assert rank.results_alone == (1 if async_scheduling else 6)


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
        queues = [submit(engine, f"r{i}", max_tokens=20) for i in range(3)]
        finals = [until_final(q)[-1] for q in queues]
        assert all(d.finish_reason == "abort" and d.error for d in finals)
        with pytest.raises(RuntimeError, match="the engine has failed"):
            submit(engine, "late")
        with engine.lock:
            assert not engine.scheduler.requests and not engine._in_step
