"""The engine loop of one replica, on its own thread.

    add_request / abort  (any thread)            step loop (engine thread)
            |                                    plan = scheduler.schedule()
            v                                    send plan to every rank's Execute stream
      Scheduler, under the lock  <-------------  read StepResults (rank 0 carries the tokens)
                                                 scheduler.update(); detokenize; sink(delta)

Each rank holds one long-lived bidirectional Execute stream. The loop keeps one step in flight
(synchronous scheduling); the plan never carries back a token the workers produced.
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from protos import worker_pb2, worker_pb2_grpc
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler
from scheduler.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class Delta:
    """What one completion of a client request gained in one step; the completion's last delta
    has finish_reason set."""

    request_id: str  # the client's request id
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)  # on the last delta
    num_output_tokens: int = 0
    error: str | None = None  # the engine failed; the request is lost to it
    num_cached_tokens: int = 0  # on the last delta, as are the timings (milliseconds)
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    index: int = 0  # which of the request's n completions


Sink = Callable[[Delta], None]


@dataclass
class StepRecord:
    step_id: int
    start: float
    duration_ms: float
    scheduled: dict[str, int]  # request id -> tokens computed in this step
    new_request_ids: list[str] = field(default_factory=list)
    num_waiting: int = 0


class WorkerStream:
    """The Execute stream to one rank: send() a plan, recv() its result, in order."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 256 << 20)]
        )
        self._plans: queue.SimpleQueue = queue.SimpleQueue()
        stub = worker_pb2_grpc.WorkerStub(self._channel)
        self._results = stub.Execute(self._iter_plans())

    def _iter_plans(self) -> Iterator[worker_pb2.StepPlan]:
        while (plan := self._plans.get()) is not None:
            yield plan

    def send(self, plan: worker_pb2.StepPlan) -> None:
        self._plans.put(plan)

    def recv(self) -> worker_pb2.StepResult:
        return next(self._results)

    def close(self) -> None:
        self._plans.put(None)
        self._channel.close()


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        worker_addresses: list[str],
        max_step_records: int = 4096,
    ) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.step_records: deque[StepRecord] = deque(maxlen=max_step_records)
        self.num_steps = 0
        self.num_finished = 0
        self.num_generated_tokens = 0
        self.error: str | None = None
        self._streams = [WorkerStream(address) for address in worker_addresses]
        self._sinks: dict[str, Sink] = {}  # client request id -> its sink
        self._detoks: dict[str, IncrementalDetokenizer] = {}  # completion id -> its detokenizer
        self._cond = threading.Condition()
        self.lock = self._cond  # held to read the scheduler's state from another thread
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def add_request(self, request: Request, sink: Sink) -> None:
        """Queues a request; sink receives the deltas of its n completions on the engine thread.

        Raises RuntimeError if the engine has failed, and what Scheduler.add_request raises.
        """
        skip_special = request.sampling_params.skip_special_tokens
        with self._cond:
            if self.error is not None:
                raise RuntimeError(f"the engine has failed: {self.error}")
            for completion in self.scheduler.add_request(request):
                self._detoks[completion.request_id] = IncrementalDetokenizer(
                    self.tokenizer, skip_special
                )
            self._sinks[request.request_id] = sink
            self._cond.notify()

    def abort(self, request_id: str) -> bool:
        """Aborts a client request's unfinished completions; each gets its final delta."""
        with self._cond:
            aborted = self.scheduler.abort_request(request_id)
            sink = self._sinks.pop(request_id, None)
            detoks = [self._detoks.pop(r.request_id) for r in aborted]
        if not aborted or sink is None:
            return False
        self.num_finished += 1
        for request, detok in zip(aborted, detoks, strict=True):
            sink(self._final_delta(request, detok, []))
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for stream in self._streams:
            stream.close()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopped and not self.scheduler.has_work():
                        self._cond.wait(timeout=1.0)
                    if self._stopped:
                        return
                    start = time.monotonic()
                    plan = self.scheduler.schedule()
                    num_waiting = len(self.scheduler.waiting)
                result = self._execute(plan)
                with self._cond:
                    updates = self.scheduler.update(
                        list(result.request_ids), list(result.token_ids)
                    )
                    deliveries = [
                        (request, token, self._sinks.get(request.group_id), self._detok(request))
                        for request, token in updates
                    ]
                    for request, _, _, _ in deliveries:  # drop the sinks of ended requests
                        group = request.group_id
                        if group not in self.scheduler.groups and self._sinks.pop(group, None):
                            self.num_finished += 1
                self._record(plan, start, num_waiting)
                for request, token, sink, detok in deliveries:
                    if sink is not None and detok is not None:
                        sink(self._delta(request, detok, token))
        except Exception as e:  # a worker failed: every request still held is lost to it
            log.exception("engine step failed")
            self._fail(f"{type(e).__name__}: {e}")

    def _execute(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        for stream in self._streams:
            stream.send(plan)
        results = [stream.recv() for stream in self._streams]
        for stream, result in zip(self._streams, results, strict=True):
            if result.step_id != plan.step_id:
                raise RuntimeError(
                    f"worker {stream.address} answered step {result.step_id}, "
                    f"expected {plan.step_id}"
                )
        return results[0]

    def _record(self, plan: worker_pb2.StepPlan, start: float, num_waiting: int) -> None:
        scheduled = {r.request_id: r.num_scheduled_tokens for r in plan.new_requests}
        cached = plan.cached_requests
        scheduled.update(zip(cached.request_ids, cached.num_scheduled_tokens, strict=True))
        self.num_steps += 1
        self.step_records.append(
            StepRecord(
                step_id=plan.step_id,
                start=start,
                duration_ms=(time.monotonic() - start) * 1e3,
                scheduled=scheduled,
                new_request_ids=[r.request_id for r in plan.new_requests],
                num_waiting=num_waiting,
            )
        )

    def _detok(self, request: Request) -> IncrementalDetokenizer | None:
        """The completion's detokenizer; dropped with its last token (under the lock)."""
        if request.status.finished:
            return self._detoks.pop(request.request_id, None)
        return self._detoks.get(request.request_id)

    def _delta(self, request: Request, detok: IncrementalDetokenizer, token: int) -> Delta:
        self.num_generated_tokens += 1
        if request.status.finished:
            return self._final_delta(request, detok, [token])
        return Delta(request.group_id, [token], detok.add([token]), index=request.index)

    @staticmethod
    def _final_delta(request: Request, detok: IncrementalDetokenizer, tokens: list[int]) -> Delta:
        text = detok.add(tokens) + detok.flush()
        return Delta(
            request.group_id,
            tokens,
            text,
            finish_reason=request.finish_reason,
            prompt_token_ids=request.prompt_token_ids,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
            queue_ms=_since(request.arrival_time, request.first_scheduled_time),
            ttft_ms=_since(request.arrival_time, request.first_token_time),
            total_ms=_since(request.arrival_time, time.monotonic()),
            index=request.index,
        )

    def _fail(self, error: str) -> None:
        with self._cond:
            self.error = error
            sinks = list(self._sinks.items())
            self._sinks.clear()
            self._detoks.clear()
            for rid, _ in sinks:
                self.scheduler.abort_request(rid)
        for rid, sink in sinks:
            sink(
                Delta(rid, [], "", finish_reason=RequestStatus.FINISHED_ABORTED.value, error=error)
            )


def _since(start: float, end: float | None) -> float:
    """Milliseconds from start to end (0 when end never came: an abort before it)."""
    return 0.0 if end is None else (end - start) * 1e3
