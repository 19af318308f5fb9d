"""The engine loop of one replica, on its own thread. It speaks token ids only.

    add_request / abort / stop  (any thread)     step loop (engine thread)
            |                                    plan N+1 = scheduler.schedule()
            v                                    send it to every rank's Execute stream
      Scheduler, under the lock  <-------------  read step N's StepResults (rank 0: tokens)
                                                 scheduler.update()
                                                 each sink (a frontend): one StepOutputs

    engine    plan N+1, send | receive N, learn N | plan N+2, send | receive N+1, learn N+1 |
    workers   ------ step N ------|------ step N+1 ------|------ step N+2 ------|

Every client request has a sink (the frontend that added it). Each learned step gives each sink
one message holding its requests' new tokens, logprobs and ends; an abort or a stop answers the
completions it ends at once. Sinks are called under the lock, so what one sink receives of one
request is in order: its tokens, then its end, then nothing.

Each rank holds one long-lived bidirectional Execute stream and runs its plans in order. With
async scheduling (scheduler.async_scheduling, the default) the loop keeps up to two steps in
flight: it plans and sends step N+1 before it learns step N's tokens, so planning and transport
overlap the device's work on step N. The plan never carries back a token the workers produced
(they append their own samples), so plan N+1 needs none of step N's: see scheduler.py for what
a request's pending tokens change, and why a request that stops costs at most one more token,
discarded. Without it the loop keeps one step in flight.

A worker that fails (its process dies, its Execute stream breaks or answers an error) fails the
engine within moments, busy or idle: each stream's end is watched (a done-callback on the call)
and wakes the loop. The engine then stops stepping and calls its on_failure (the fleet), which
takes its unfinished requests (take_unfinished) to recompute them elsewhere: the tokens of steps
in flight that were never learned are simply not emitted, they will be sampled again. An engine
without on_failure answers them lost (UNAVAILABLE).

A worker that hangs without dying fails the engine the same way. Its channel's keepalive
(protos/keepalive.py) ends the stream of a stopped process or a vanished host within seconds; a
live process stuck inside a step (a hung kernel, a deadlocked collective) still answers pings,
so a watchdog thread fails the engine once the oldest step in flight has waited
scheduler.step_timeout_s for a rank's result: its reason names the rank, the step and the
seconds, and it cancels every rank's stream, which ends the loop's wait. A step's clock starts
when it becomes the one the loop waits for (sent, and the step before it learned), so a step
queued behind another on the workers is not charged for that one's time, and an idle engine
(nothing in flight) is never charged at all.
"""

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from protos import frontend_pb2, worker_pb2
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler
from scheduler.core.step_outputs import StepOutputsBuilder
from scheduler.core.worker_client import WorkerClient, WorkerStream
from scheduler.logprobs import unpack_logprobs

log = logging.getLogger(__name__)

_WATCHDOG_POLL_S = 1.0  # the step watchdog looks this often (or 4 times a step_timeout_s)


class OutputSink(Protocol):
    """Where a request's outputs go (the core's link to the frontend that added it)."""

    def send(self, outputs: frontend_pb2.StepOutputs) -> None:
        """Takes one message; called under an engine's lock, so it must not block."""
        ...


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


@dataclass(frozen=True)
class _Awaited:
    """The result the loop waits for now: step step_id's, from rank `rank`, since `since`
    (time.monotonic(): the step was sent and the one before it learned)."""

    step_id: int
    rank: int
    since: float


# A client request's unfinished completions and the sink of its outputs, as a failed engine
# hands them over.
HeldRequest = tuple[list[Request], OutputSink]


class WorkerFailed(RuntimeError):
    """A worker's Execute stream ended while the engine was running."""


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        workers: Sequence[WorkerClient],
        max_step_records: int = 4096,
        on_failure: Callable[["Engine"], None] | None = None,
    ) -> None:
        """on_failure: called (on the engine thread, no lock held) once a worker failed and the
        engine stopped stepping; it takes the unfinished requests with take_unfinished()."""
        self.scheduler = scheduler
        self.step_records: deque[StepRecord] = deque(maxlen=max_step_records)
        self.num_steps = 0
        self.num_finished = 0
        self.num_generated_tokens = 0
        self._recorded_tokens = 0  # num_generated_tokens when the last step record was written
        self._last_learned: float | None = None  # time.monotonic() the newest step was learned
        self.error: str | None = None  # why a worker failed, once one has
        self._on_failure = on_failure
        # A worker's stream ended unasked (set by its done-callback): the loop fails on it.
        self._broken: str | None = None
        # No request is taken any more: the engine failed and handed its requests over.
        self._closed = False
        self._streams = [worker.execute() for worker in workers]
        # Steps sent, oldest first (engine thread): at most 2 with async scheduling, else 1.
        self._in_flight: deque[_SentStep] = deque()
        self._max_in_flight = 2 if scheduler.config.async_scheduling else 1
        # Client request id -> its sink, while any of its completions is unfinished.
        self._sinks: dict[str, OutputSink] = {}
        self._cond = threading.Condition()
        self.lock = self._cond  # held to read the scheduler's state from another thread
        self._stopped = False
        # Set by the loop thread alone, without the lock (the watchdog reads a snapshot).
        self._awaited: _Awaited | None = None
        self._watchdog_done = threading.Event()  # stop() or a failure: the watchdog ends
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
        self._watchdog.start()
        for stream in self._streams:
            stream.on_end(self._stream_ended)

    def add_request(self, request: Request, sink: OutputSink) -> None:
        """Queues a request; sink receives the outputs of its n completions.

        Raises RuntimeError if the engine has failed and handed its requests over, and what
        Scheduler.add_request raises.
        """
        with self._cond:
            self._check_open()
            self.scheduler.add_request(request)
            self._sinks[request.request_id] = sink
            self._cond.notify()

    def adopt(self, completions: list[Request], sink: OutputSink) -> None:
        """Takes over a client request's unfinished completions from a failed replica, to be
        recomputed here (Scheduler.adopt); its sink keeps receiving its outputs, continuing
        from the tokens it already got. Raises as add_request does."""
        with self._cond:
            self._check_open()
            self.scheduler.adopt(completions)
            self._sinks[completions[0].group_id] = sink
            self._cond.notify()

    def take_unfinished(self) -> list[HeldRequest]:
        """Hands over every unfinished client request of a failed engine (its completions
        ready to be recomputed, and its sink); the engine takes no request afterwards."""
        with self._cond:
            assert self.error is not None, "only a failed engine hands its requests over"
            self._closed = True
            groups = self.scheduler.release_all()
            held = [(groups[request_id], sink) for request_id, sink in self._sinks.items()]
            self._sinks.clear()
            return held

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the engine has failed: {self.error}")

    def abort(self, request_id: str, owner: str = "") -> bool:
        """Aborts a client request's unfinished completions; its sink gets their ends now (the
        tokens steps in flight sample for them are discarded). Whether it was found: a request
        of another owner is not (owner "" finds any)."""
        with self._cond:
            sink = self._sinks.get(request_id)
            group = self.scheduler.groups.get(request_id, ())
            if sink is None or (owner and any(r.owner != owner for r in group)):
                return False
            outputs = StepOutputsBuilder()
            for request in self.scheduler.abort_request(request_id):
                outputs.finished(request)
            self._end(request_id)
            sink.send(outputs.build())
        return True

    def abort_all(self, sink: OutputSink) -> int:
        """Aborts every request of one sink (its frontend went away); how many."""
        with self._cond:
            owned = [rid for rid, s in self._sinks.items() if s is sink]
        return sum(self.abort(rid) for rid in owned)

    def stop_completion(self, request_id: str, index: int, stop_str: str) -> bool:
        """Finishes completion `index` of a client request whose text reached stop_str (the
        frontend matched it); its sink gets the end now. Whether it was unfinished."""
        with self._cond:
            group = self.scheduler.groups.get(request_id, ())
            request = next((r for r in group if r.index == index), None)
            if request is None:
                return False
            sink = self._sinks[request_id]
            self.scheduler.stop_request(request, stop_str)
            outputs = StepOutputsBuilder()
            outputs.finished(request)
            if request_id not in self.scheduler.groups:
                self._end(request_id)
            sink.send(outputs.build())
        return True

    def num_unfinished(self, sink: OutputSink | None = None) -> int:
        """Client requests still to be answered (of one sink, if given); a draining replica
        stops at 0."""
        with self._cond:
            if sink is None:
                return len(self._sinks)
            return sum(s is sink for s in self._sinks.values())

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
        self._watchdog_done.set()
        self._watchdog.join(timeout=10)
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
                    while not (
                        self._stopped or self._broken or in_flight or self.scheduler.has_work()
                    ):
                        self._cond.wait()
                    if self._stopped:
                        return
                    if self._broken:
                        raise WorkerFailed(self._broken)
                    if len(in_flight) < self._max_in_flight and self.scheduler.has_work():
                        # While a step is in flight, one that computes nothing (each running
                        # request waits on a pending token) waits for its result instead.
                        plan = self.scheduler.schedule(skip_empty=bool(in_flight))
                        num_waiting = len(self.scheduler.waiting)
                if plan is not None:
                    self._send(plan, num_waiting)
                    if len(in_flight) < self._max_in_flight:
                        continue  # plan the next step before waiting on this one
                step = in_flight.popleft()  # never empty here: see the wait above
                result = self._receive(step)
                self._learn(result)
                self._record(step, result)
        except Exception as e:  # a worker failed: its requests go to the failure handler
            with self._cond:
                if self._stopped:
                    return  # stop() closed the streams under a step: no failure
            log.exception("engine step failed")
            self._fail(self._broken or f"{type(e).__name__}: {e}")

    def _watch(self) -> None:
        """The step watchdog (its own thread): fails the engine once the result the loop waits
        for is scheduler.step_timeout_s late."""
        timeout = self.scheduler.config.step_timeout_s
        while not self._watchdog_done.wait(min(timeout / 4, _WATCHDOG_POLL_S)):
            awaited = self._awaited
            if awaited is None:
                continue
            waited = time.monotonic() - awaited.since
            if waited < timeout:
                continue
            # With tensor parallelism a rank stuck in a collective with a hung peer looks the
            # same: the rank named is the first whose result is missing.
            address = self._streams[awaited.rank].address
            self._break(
                f"step {awaited.step_id} hangs: worker rank {awaited.rank} ({address}) sent no "
                f"result in {waited:.1f} s (scheduler.step_timeout_s={timeout:g})",
                awaited,
            )
            return

    def _break(self, why: str, awaited: _Awaited) -> None:
        """Fails the engine on a hung rank, unless the awaited result came meanwhile: the
        reason first, then every stream cancelled, so the loop's wait ends and fails on it."""
        with self._cond:
            if self._stopped or self._broken is not None or self._awaited is not awaited:
                return
            self._broken = why
            self._cond.notify()
        log.error("%s", why)
        for stream in self._streams:
            stream.cancel()

    def _stream_ended(self, stream: WorkerStream, why: str) -> None:
        """A rank's Execute stream ended (its done-callback): unless the engine stops, the rank
        failed, and the loop, waiting or stepping, fails on it now."""
        with self._cond:
            if self._stopped or self._broken is not None:
                return
            self._broken = f"worker {stream.address} failed: {why}"
            self._cond.notify()

    def _learn(self, result: worker_pb2.StepResult) -> None:
        """Appends a step's tokens; each sink gets its requests' tokens and ends in one
        message."""
        ids = list(result.request_ids)
        # A request samples once a step: its id names its position's logprobs, where asked.
        logprobs = dict(zip(ids, unpack_logprobs(result), strict=True))
        with self._cond:
            updates = self.scheduler.update(ids, list(result.token_ids))
            # Taken before any is dropped: the n completions of a request share one sink.
            sinks = [self._sinks[request.group_id] for request, _ in updates]
            batches: dict[OutputSink, StepOutputsBuilder] = {}
            for (request, token), sink in zip(updates, sinks, strict=True):
                outputs = batches.get(sink)
                if outputs is None:
                    outputs = batches[sink] = StepOutputsBuilder()
                outputs.token(request, token, logprobs[request.request_id])
                self.num_generated_tokens += 1
                if request.status.finished:
                    outputs.finished(request)
                    group = request.group_id
                    if group not in self.scheduler.groups and group in self._sinks:
                        self._end(group)  # its last completion ended
            for sink, outputs in batches.items():
                sink.send(outputs.build())

    def _end(self, request_id: str) -> None:
        """The client request's last completion ended (under the lock)."""
        del self._sinks[request_id]
        self.num_finished += 1

    def _send(self, plan: worker_pb2.StepPlan, num_waiting: int) -> None:
        self._in_flight.append(_SentStep(plan, time.monotonic(), num_waiting))
        for stream in self._streams:
            stream.send(plan)

    def _receive(self, step: _SentStep) -> worker_pb2.StepResult:
        """Every rank's result of the oldest step in flight; rank 0's carries the tokens. The
        watchdog sees which result is awaited, and since when."""
        plan, since = step.plan, self._charged_since(step)
        results = []
        for rank, stream in enumerate(self._streams):
            self._awaited = _Awaited(plan.step_id, rank, since)
            results.append(stream.recv())
        self._awaited = None
        for stream, result in zip(self._streams, results, strict=True):
            if result.step_id != plan.step_id:
                raise RuntimeError(
                    f"worker {stream.address} answered step {result.step_id}, "
                    f"expected {plan.step_id}"
                )
        return results[0]

    def _charged_since(self, step: _SentStep) -> float:
        """When the oldest step in flight began to be the workers' business alone: it was sent,
        and the step before it learned (the watchdog's clock, and the record's interval)."""
        return step.sent if self._last_learned is None else max(step.sent, self._last_learned)

    def _record(self, step: _SentStep, result: worker_pb2.StepResult) -> None:
        """A learned step's record; its duration runs from sending its plan to learning it."""
        plan = step.plan
        scheduled = {r.request_id: r.num_scheduled_tokens for r in plan.new_requests}
        cached = plan.cached_requests
        scheduled.update(zip(cached.request_ids, cached.num_scheduled_tokens, strict=True))
        self.num_steps += 1
        now = time.monotonic()
        since = self._charged_since(step)
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

    def _fail(self, error: str) -> None:
        """A worker failed: the engine steps no more. The failure handler takes its requests
        (to recompute them elsewhere); without one, every request still held is lost, and
        answered so."""
        self._watchdog_done.set()
        with self._cond:
            self.error = error
            self._in_flight.clear()  # their tokens are never learned: sampled again elsewhere
        if self._on_failure is not None:
            self._on_failure(self)
            return
        with self._cond:
            self._closed = True
            for request_id, sink in list(self._sinks.items()):
                self.scheduler.abort_request(request_id)
                outputs = StepOutputsBuilder()
                outputs.failed(request_id, grpc.StatusCode.UNAVAILABLE, error)
                sink.send(outputs.build())
            self._sinks.clear()
