"""The engine loop of one replica, on its own thread.

    add_request / abort  (any thread)            step loop (engine thread)
            |                                    plan N+1 = scheduler.schedule()
            v                                    send it to every rank's Execute stream
      Scheduler, under the lock  <-------------  read step N's StepResults (rank 0: tokens)
                                                 scheduler.update()
                                                 detokenize, match stop strings (no lock)
                                                 stop those that matched; sink(delta)

    engine    plan N+1, send | receive N, learn N | plan N+2, send | receive N+1, learn N+1 |
    workers   ------ step N ------|------ step N+1 ------|------ step N+2 ------|

A completion's sink gets a delta per step (DELTA), or only its last one holding every token,
the whole text and all logprobs (FINAL_ONLY: no per-step text or logprob decoding, no message).

Each rank holds one long-lived bidirectional Execute stream and runs its plans in order. With
async scheduling (scheduler.async_scheduling, the default) the loop keeps up to two steps in
flight: it plans and sends step N+1 before it learns step N's tokens, so planning, transport
and detokenization overlap the device's work on step N. The plan never carries back a token the
workers produced (they append their own samples), so plan N+1 needs none of step N's: see
scheduler.py for what a request's pending tokens change, and why a request that stops costs at
most one more token, discarded. Without it the loop keeps one step in flight.

The engine thread alone touches a completion's text while a step is in flight; an abort that
lands then is answered at the end of the step being learned.
"""

import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from protos import worker_pb2, worker_pb2_grpc
from scheduler.frontend.completion_text import CompletionText, add_all
from scheduler.logprobs import Logprob, PositionLogprobs, unpack_logprobs
from scheduler.request import Request, RequestStatus
from scheduler.sampling_params import RequestOutputKind
from scheduler.scheduler import Scheduler
from scheduler.frontend.tokenizer import Tokenizer

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
    # When logprobs were asked: one entry per token of token_ids, and the running sum.
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # on the last delta: the stop token id or string

    def then(self, later: "Delta") -> "Delta":
        """This delta and a later one of the same completion, as one."""
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return dataclasses.replace(
            later,
            token_ids=self.token_ids + later.token_ids,
            text=self.text + later.text,
            logprobs=logprobs,
        )


Sink = Callable[[Delta], None]


@dataclass
class StepRecord:
    step_id: int
    start: float  # time.monotonic() when its plan was sent
    duration_ms: float  # from sending its plan to learning its result
    # From learning the step before to learning this one: the step's share of the time when
    # steps run back to back (with two in flight, duration_ms spans the step before too).
    interval_ms: float
    scheduled: dict[str, int]  # request id -> tokens computed in this step
    new_request_ids: list[str] = field(default_factory=list)
    num_waiting: int = 0
    num_generated_tokens: int = 0  # tokens the engine generated since the previous record
    dropped_request_ids: list[str] = field(default_factory=list)  # finished or aborted before
    worker_ms: float = 0.0  # rank 0's time in Execute (the step's device work and its Python)
    worker_idle_ms: float = 0.0  # rank 0's host time before this step's launch (device idle)
    cuda_graph: bool = False  # the step replayed a captured decode graph


@dataclass
class _SentStep:
    """A step sent to the workers whose result is not learned yet."""

    plan: worker_pb2.StepPlan
    sent: float  # time.monotonic() when it was sent
    num_waiting: int  # waiting requests when it was planned


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
        # token id -> its text alone (a logprob's decoded_token); at most the vocabulary.
        self._token_texts: dict[int, str] = {}
        self.step_records: deque[StepRecord] = deque(maxlen=max_step_records)
        self.num_steps = 0
        self.num_finished = 0
        self.num_generated_tokens = 0
        self._recorded_tokens = 0  # num_generated_tokens when the last step record was written
        self._last_learned: float | None = None  # time.monotonic() the newest step was learned
        self.error: str | None = None
        self._streams = [WorkerStream(address) for address in worker_addresses]
        # Steps sent, oldest first (engine thread): at most 2 with async scheduling, else 1.
        self._in_flight: deque[_SentStep] = deque()
        self._max_in_flight = 2 if scheduler.config.async_scheduling else 1
        self._sinks: dict[str, Sink] = {}  # client request id -> its sink
        self._texts: dict[str, CompletionText] = {}  # completion id -> its text
        self._in_step = False  # a step is in flight: the engine thread may touch the texts
        self._aborted: list[tuple[list[Request], Sink]] = []  # answered at the step's end
        self._cond = threading.Condition()
        self.lock = self._cond  # held to read the scheduler's state from another thread
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def add_request(self, request: Request, sink: Sink) -> None:
        """Queues a request; sink receives the deltas of its n completions on the engine thread.

        Raises RuntimeError if the engine has failed, and what Scheduler.add_request raises.
        """
        with self._cond:
            if self.error is not None:
                raise RuntimeError(f"the engine has failed: {self.error}")
            for completion in self.scheduler.add_request(request):
                self._texts[completion.request_id] = CompletionText(
                    self.tokenizer, request.sampling_params
                )
            self._sinks[request.request_id] = sink
            self._cond.notify()

    def abort(self, request_id: str) -> bool:
        """Aborts a client request's unfinished completions; each gets its final delta."""
        with self._cond:
            aborted = self.scheduler.abort_request(request_id)
            sink = self._sinks.pop(request_id, None)
            if not aborted or sink is None:
                return False
            self.num_finished += 1
            if self._in_step:  # the engine thread owns the texts until the step's end
                self._aborted.append((aborted, sink))
            else:
                self._answer_aborted(aborted, sink)
        return True

    def _answer_aborted(self, aborted: list[Request], sink: Sink) -> None:
        for request in aborted:
            text = self._texts.pop(request.request_id)
            text.finish()
            sink(self._final_delta(request, text, []))

    def num_unfinished(self) -> int:
        """Client requests still to be answered (a draining replica stops at 0)."""
        with self._cond:
            return len(self._sinks)

    def generated_tokens_per_s(self, window_s: float) -> float:
        """Tokens generated by the steps that started in the last window_s seconds, per second
        of the window (from the step records)."""
        since = time.monotonic() - window_s
        records = list(self.step_records)  # a snapshot: the engine thread appends
        return sum(r.num_generated_tokens for r in records if r.start >= since) / window_s

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)
        for stream in self._streams:
            stream.close()

    def _loop(self) -> None:
        """Each turn plans and sends a step while fewer than the most are in flight and there
        is work; else (or when the steps in flight are as many as allowed) learns the oldest."""
        in_flight = self._in_flight
        try:
            while True:
                plan = None
                with self._cond:
                    while not self._stopped and not in_flight and not self.scheduler.has_work():
                        self._cond.wait(timeout=1.0)
                    if self._stopped:
                        return
                    if len(in_flight) < self._max_in_flight and self.scheduler.has_work():
                        # While a step is in flight, one that computes nothing (each running
                        # request waits on a pending token) waits for its result instead.
                        plan = self.scheduler.schedule(skip_empty=bool(in_flight))
                        num_waiting = len(self.scheduler.waiting)
                    if plan is not None:
                        self._in_step = True
                if plan is not None:
                    self._send(plan, num_waiting)
                    if len(in_flight) < self._max_in_flight:
                        continue  # plan the next step before waiting on this one
                step = in_flight.popleft()  # never empty here: see the wait above
                result = self._receive(step.plan)
                self._learn(result)
                self._record(step, result)
        except Exception as e:  # a worker failed: every request still held is lost to it
            log.exception("engine step failed")
            self._fail(f"{type(e).__name__}: {e}")

    def _learn(self, result: worker_pb2.StepResult) -> None:
        """Appends a step's tokens, turns them into text, stops the completions whose text
        reached a stop string, and sends every live completion its delta."""
        logprobs = unpack_logprobs(result)
        with self._cond:
            updates = self.scheduler.update(
                list(result.request_ids), list(result.token_ids), logprobs
            )
            texts = [self._texts.get(request.request_id) for request, _ in updates]
        # Detokenizing is the slow part: outside the lock (add_request and abort go on), and
        # the whole step's at once.
        live = [k for k, text in enumerate(texts) if text is not None]
        stops: list[str | None] = [None] * len(updates)
        found = add_all([texts[k] for k in live], [[updates[k][1]] for k in live])
        for k, stop in zip(live, found, strict=True):
            stops[k] = stop
        decoded: list[list[PositionLogprobs] | None] = []
        for (request, _), text, stop in zip(updates, texts, stops, strict=True):
            ended = request.status.finished or stop is not None
            if text is not None and ended:
                text.finish()
            decoded.append(self._decoded_logprobs(request, ended))
        with self._cond:
            self._in_step = bool(self._in_flight)  # the next step's abort waits for its end
            for (request, _), stop in zip(updates, stops, strict=True):
                if stop is not None:
                    self.scheduler.stop_request(request, stop)
            # Taken before any is dropped: the n completions of a request share one sink.
            sinks = [self._sinks.get(request.group_id) for request, _ in updates]
            learned = zip(updates, texts, decoded, sinks, strict=True)
            for (request, token), text, lp, sink in learned:
                if text is None or request.status is RequestStatus.FINISHED_ABORTED:
                    continue  # aborted while the step ran: answered below
                if request.status.finished:
                    del self._texts[request.request_id]
                    group = request.group_id
                    if group not in self.scheduler.groups and self._sinks.pop(group, None):
                        self.num_finished += 1  # its last completion ended
                self.num_generated_tokens += 1
                delta = self._delta(request, text, token, lp)
                if sink is not None and delta is not None:
                    sink(delta)
            for aborted, sink in self._aborted:
                self._answer_aborted(aborted, sink)
            self._aborted.clear()

    def _send(self, plan: worker_pb2.StepPlan, num_waiting: int) -> None:
        self._in_flight.append(_SentStep(plan, time.monotonic(), num_waiting))
        for stream in self._streams:
            stream.send(plan)

    def _receive(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        """Every rank's result of the oldest step in flight; rank 0's carries the tokens."""
        results = [stream.recv() for stream in self._streams]
        for stream, result in zip(self._streams, results, strict=True):
            if result.step_id != plan.step_id:
                raise RuntimeError(
                    f"worker {stream.address} answered step {result.step_id}, "
                    f"expected {plan.step_id}"
                )
        return results[0]

    def _record(self, step: _SentStep, result: worker_pb2.StepResult) -> None:
        """A learned step's record; its duration runs from sending its plan to learning it."""
        plan = step.plan
        scheduled = {r.request_id: r.num_scheduled_tokens for r in plan.new_requests}
        cached = plan.cached_requests
        scheduled.update(zip(cached.request_ids, cached.num_scheduled_tokens, strict=True))
        self.num_steps += 1
        now = time.monotonic()
        since = step.sent if self._last_learned is None else max(step.sent, self._last_learned)
        self._last_learned = now
        self.step_records.append(
            StepRecord(
                step_id=plan.step_id,
                start=step.sent,
                duration_ms=(now - step.sent) * 1e3,
                interval_ms=(now - since) * 1e3,
                scheduled=scheduled,
                new_request_ids=[r.request_id for r in plan.new_requests],
                num_waiting=step.num_waiting,
                num_generated_tokens=self.num_generated_tokens - self._recorded_tokens,
                dropped_request_ids=list(plan.finished_request_ids),
                worker_ms=result.execute_ms,
                worker_idle_ms=result.idle_ms,
                cuda_graph=result.cuda_graph,
            )
        )
        self._recorded_tokens = self.num_generated_tokens

    def _delta(
        self,
        request: Request,
        text: CompletionText,
        token: int,
        logprobs: list[PositionLogprobs] | None,
    ) -> Delta | None:
        """What the completion's sink gets for this step's token: None for an unfinished
        FINAL_ONLY completion."""
        if request.status.finished:
            return self._final_delta(request, text, [token], logprobs)
        if _final_only(request):
            return None
        delta = Delta(request.group_id, [token], text.take(False), index=request.index)
        if logprobs is not None:
            delta.logprobs = logprobs
            delta.cumulative_logprob = request.cumulative_logprob
        return delta

    def _final_delta(
        self,
        request: Request,
        text: CompletionText,
        tokens: list[int],
        logprobs: list[PositionLogprobs] | None = None,
    ) -> Delta:
        """A completion's last delta: its last step's tokens (DELTA), or all of them
        (FINAL_ONLY), with what the client learns at the end."""
        if _final_only(request):
            tokens = list(request.output_token_ids)
            if logprobs is None:  # an abort's: not decoded by the step
                logprobs = self._decoded_logprobs(request, True)
        delta = Delta(
            request.group_id,
            tokens,
            text.take(True),
            finish_reason=request.finish_reason,
            prompt_token_ids=request.prompt_token_ids,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
            queue_ms=_since(request.arrival_time, request.first_scheduled_time),
            ttft_ms=_since(request.arrival_time, request.first_token_time),
            total_ms=_since(request.arrival_time, time.monotonic()),
            index=request.index,
            stop_reason=request.stop_reason,
        )
        if logprobs is not None:
            delta.logprobs = logprobs
            delta.cumulative_logprob = request.cumulative_logprob
        return delta

    def _decoded_logprobs(self, request: Request, ended: bool) -> list[PositionLogprobs] | None:
        """The logprobs the completion's next delta carries, each token with its text: the
        newest position's (DELTA), or all of them once it ended (FINAL_ONLY); None when not
        asked or not sent yet."""
        if request.sampling_params.logprobs is None:
            return None
        if _final_only(request):
            if not ended:
                return None
            positions = request.output_logprobs
        else:
            positions = request.output_logprobs[-1:]
        text = self._token_text
        return [
            {token: Logprob(lp.logprob, lp.rank, text(token)) for token, lp in p.items()}
            for p in positions
        ]

    def _token_text(self, token: int) -> str:
        """decode([token]) with special tokens kept, cached: with logprobs=20 a step of 256
        completions names 5376 tokens, mostly the same few thousand."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token], False)
        return text

    def _fail(self, error: str) -> None:
        with self._cond:
            self.error = error
            for aborted, sink in self._aborted:  # aborted while the failed step ran
                self._answer_aborted(aborted, sink)
            sinks = list(self._sinks.items())
            self._sinks.clear()
            self._texts.clear()
            self._aborted.clear()
            self._in_step = False
            self._in_flight.clear()
            for rid, _ in sinks:
                self.scheduler.abort_request(rid)
        for rid, sink in sinks:
            sink(
                Delta(rid, [], "", finish_reason=RequestStatus.FINISHED_ABORTED.value, error=error)
            )


def _final_only(request: Request) -> bool:
    return request.sampling_params.output_kind is RequestOutputKind.FINAL_ONLY


def _since(start: float, end: float | None) -> float:
    """Milliseconds from start to end (0 when end never came: an abort before it)."""
    return 0.0 if end is None else (end - start) * 1e3
