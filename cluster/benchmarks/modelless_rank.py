"""A worker's gRPC service without a model, for benchmarks and tests of the engine core: it is
brought up as a worker is (Health, InitDistributed, LoadModel, InitCache answer at once, as a
CPU rank of a model of `vocab_size` tokens and `max_model_len` positions would) and leaves
Execute, the tokens it samples, to its subclass. `paced` has a rank's answers take a device's
step time; SequenceRank samples as the worker does (a token once a prompt is computed), paced;
serve_rank serves a rank in a process of its own."""

import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from protos import keepalive, worker_pb2, worker_pb2_grpc


class ModellessRank(worker_pb2_grpc.WorkerServicer):
    def __init__(self, architecture: str, vocab_size: int, max_model_len: int) -> None:
        self.architecture = architecture
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def Health(self, request, context) -> worker_pb2.HealthResponse:
        return worker_pb2.HealthResponse(ready=True, device="cpu")

    def InitDistributed(self, request, context) -> worker_pb2.Empty:
        return worker_pb2.Empty()

    def LoadModel(self, request, context) -> worker_pb2.ModelInfo:
        return worker_pb2.ModelInfo(
            architecture=self.architecture,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_model_len,
        )

    def InitCache(self, request, context) -> worker_pb2.Empty:
        return worker_pb2.Empty()


def paced(
    plans: Iterator[worker_pb2.StepPlan],
    device_ms: float | Callable[[worker_pb2.StepPlan], float],
    answer: Callable[[worker_pb2.StepPlan, float], worker_pb2.StepResult],
) -> Iterator[worker_pb2.StepResult]:
    """A rank's Execute stream: answer(plan, idle_s) for each plan, at once with device_ms 0;
    else as a device that runs one step at a time for device_ms (a plan's, where a function),
    a plan launched as soon as it arrives (as the worker launches ahead):

        step N ends at max(N's arrival, N-1's end) + device_ms
        its idle_s: how long the device waited for it, max(N's arrival - N-1's end, 0)
    """
    if not device_ms:
        for plan in plans:
            yield answer(plan, 0.0)
        return
    step_ms = device_ms if callable(device_ms) else lambda plan: device_ms
    arrivals: queue.SimpleQueue = queue.SimpleQueue()

    def read() -> None:  # plans are taken as they come, while a step "runs"
        try:
            for plan in plans:
                arrivals.put((time.monotonic(), plan))
        except grpc.RpcError:  # the engine closed the stream
            pass
        arrivals.put(None)

    threading.Thread(target=read, daemon=True).start()
    free_at = None  # when the device finishes the last step launched
    while (item := arrivals.get()) is not None:
        arrived, plan = item
        start = arrived if free_at is None else max(arrived, free_at)
        idle = 0.0 if free_at is None else start - free_at
        free_at = start + step_ms(plan) / 1e3
        time.sleep(max(free_at - time.monotonic(), 0.0))
        yield answer(plan, idle)


FIRST_TOKEN = 1000
TOKEN_RANGE = 20000
SEQUENCE_VOCAB_SIZE = FIRST_TOKEN + TOKEN_RANGE  # what SequenceRank reports


class SequenceRank(ModellessRank):
    """Rank 0 of a replica without a model, as the worker samples: a request samples once its
    prompt is computed (a chunk that ends short of it samples nothing), then every step; its
    n-th token is FIRST_TOKEN + (37 * n) % TOKEN_RANGE (ordinary tokens of a tokenizer of at
    least SEQUENCE_VOCAB_SIZE, so detokenization does real work). Paced (`paced`): each step
    takes device_ms, plus prefill_us for each token scheduled beyond one a request."""

    def __init__(self, max_model_len: int, device_ms: float = 0.0, prefill_us: float = 0.0):
        super().__init__("Sequence", SEQUENCE_VOCAB_SIZE, max_model_len)
        self.device_ms = device_ms
        self.prefill_us = prefill_us
        self._lengths: dict[str, int] = {}  # request id -> its tokens (prompt + sampled)
        self._sampled: dict[str, int] = {}  # request id -> tokens it has sampled

    def _answer(self, plan: worker_pb2.StepPlan, idle_s: float) -> worker_pb2.StepResult:
        lengths, sampled = self._lengths, self._sampled
        for rid in (*plan.finished_request_ids, *plan.preempted_request_ids):
            lengths.pop(rid, None)
            sampled.pop(rid, None)
        ids, tokens = [], []

        def step(rid: str, reached: int) -> None:
            if reached >= lengths[rid]:  # its last known token is computed: it samples
                n = sampled.get(rid, 0)
                sampled[rid], lengths[rid] = n + 1, lengths[rid] + 1
                ids.append(rid)
                tokens.append(FIRST_TOKEN + (37 * n) % TOKEN_RANGE)

        for r in plan.new_requests:
            lengths[r.request_id] = len(r.token_ids)
            step(r.request_id, r.num_computed_tokens + r.num_scheduled_tokens)
        cached = plan.cached_requests
        for rid, computed, scheduled in zip(
            cached.request_ids, cached.num_computed_tokens, cached.num_scheduled_tokens, strict=True
        ):
            step(rid, computed + scheduled)
        return worker_pb2.StepResult(
            step_id=plan.step_id, request_ids=ids, token_ids=tokens, idle_ms=idle_s * 1e3
        )

    def _device_ms(self, plan: worker_pb2.StepPlan) -> float:
        scheduled = sum(r.num_scheduled_tokens for r in plan.new_requests)
        scheduled += sum(plan.cached_requests.num_scheduled_tokens)
        rows = len(plan.new_requests) + len(plan.cached_requests.request_ids)
        return self.device_ms + (scheduled - rows) * self.prefill_us / 1e3

    def Execute(self, request_iterator, context):
        timed = self.device_ms or self.prefill_us
        return paced(request_iterator, self._device_ms if timed else 0.0, self._answer)


def serve_rank(rank: worker_pb2_grpc.WorkerServicer, port, stop) -> None:
    """A process's target: serves rank on a free loopback port, put on port (a queue), until
    stop (an event) is set. The engine's channel pings it, as a worker (protos/keepalive.py)."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), options=keepalive.SERVER_OPTIONS
    )
    worker_pb2_grpc.add_WorkerServicer_to_server(rank, server)
    port.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    stop.wait()
    server.stop(0)
