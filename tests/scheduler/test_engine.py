"""The engine loop against a fake rank over real gRPC: token deltas, stop strings, n > 1, and
aborts that land while a step is in flight. No model, no torch."""

import queue
import threading
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


class FakeRank(worker_pb2_grpc.WorkerServicer):
    """Answers each plan like rank 0, sampling the token after the request's last one (1, 2,
    3, ...). With `hold` set, the next step waits for `release` (and sets `held` first). With
    `logprobs` set, every token comes with logprob -token / 10 and rank 1 (no top k)."""

    def __init__(self) -> None:
        self.worker = FakeWorker(num_blocks=64, block_size=4)
        self.hold = False
        self.logprobs = False
        self.held = threading.Event()
        self.release = threading.Event()

    def Execute(self, request_iterator, context):
        for plan in request_iterator:
            if self.hold:
                self.held.set()
                assert self.release.wait(TIMEOUT)
            ids = self.worker.execute(plan)
            tokens = [self.worker.tokens[rid][-1] % 9 + 1 for rid in ids]
            for rid, token in zip(ids, tokens, strict=True):
                self.worker.learn(rid, token)
            result = worker_pb2.StepResult(step_id=plan.step_id, request_ids=ids, token_ids=tokens)
            if self.logprobs:
                result.sampled_logprobs.extend(-t / 10 for t in tokens)
                result.sampled_ranks.extend([1] * len(tokens))
                result.num_top_logprobs.extend([0] * len(tokens))
            yield result


@pytest.fixture
def rank():
    return FakeRank()


@pytest.fixture
def engine(rank):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServicer_to_server(rank, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    scheduler = Scheduler(SchedulerConfig(8, 64), PageTableManager(64, 4, True))
    engine = Engine(scheduler, PieceTokenizer(), [f"127.0.0.1:{port}"])
    yield engine
    engine.stop()
    server.stop(grace=None)


def submit(engine: Engine, rid: str, **params) -> "queue.Queue[Delta]":
    deltas: queue.Queue[Delta] = queue.Queue()
    request = Request(
        request_id=rid,
        prompt_token_ids=[1],
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
