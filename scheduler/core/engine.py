"""The engine loop of one replica, on its own thread. It speaks token ids only.

    add_request / abort / stop  (any thread)     step loop (engine thread)
            |                                    plan N+1 = scheduler.schedule()
            v                                    send it to every rank's Execute stream
      Scheduler, under the lock  <-------------  read step N's StepResults (rank 0: tokens)
                                                 scheduler.update()
                                                 each sink (a frontend): one StepOutputs

    engine    plan N+1, send | receive N, learn N | plan N+2, send | N's outputs | receive N+1 ...
    workers   ------ step N ------|------ step N+1 ---------------------------------|-- N+2 --

Between learning step N and sending plan N+2 the device has only step N+1 left: that turnaround
is the engine's time on the device's critical path, so it holds only what the next plan needs
(Scheduler.update, then schedule()). Step N's outputs (one message per sink) and its record are
made after the plan is sent, while the workers run; anything else that sends a sink a message
(an abort, a stop string's end, a failure) sends the unsent outputs first, so each request's
messages stay in order.

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

import dataclasses
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from protos import frontend_pb2, serving_pb2, worker_pb2
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler
from scheduler.core.step_outputs import StepOutputsBuilder
from scheduler.core.worker_client import WorkerClient, WorkerStream
from scheduler.logprobs import unpack_logprobs

log = logging.getLogger(__name__)

MAX_STEP_RECORDS = 1024  # a replica's latest learned steps kept as StepRecords
# generated_tokens_per_s: cumulative token counts sampled this often, for this long.
_TOKEN_SAMPLE_S = 0.1
THROUGHPUT_HORIZON_S = 60.0
_WATCHDOG_POLL_S = 1.0  # the step watchdog looks this often (or 4 times a step_timeout_s)


class OutputSink(Protocol):
    """Where a request's outputs go (the core's link to the frontend that added it)."""

    def send(self, outputs: frontend_pb2.StepOutputs) -> None:
        """Takes one message; called under an engine's lock, so it must not block."""
        ...


@dataclass
class StepRecord:
    """One learned step. An engine keeps the latest MAX_STEP_RECORDS; the requests a step
    scheduled are kept compact, as its plan held them (a dict of 256 entries would take three
    times the memory: 28 MB for a full window of 256-request steps), and read back when asked:
    its new requests' ids and tokens, then its CachedRequests serialized (2.7 KB at 256
    requests, serialized in 7 us on the 2-core VM where reading its ids and counts took 65)."""

    step_id: int
    start: float  # time.monotonic() when its plan was sent
    duration_ms: float  # from sending its plan to learning its result
    # From learning the step before to learning this one: the step's share of the time when
    # steps run back to back (with two in flight, duration_ms spans the step before too).
    interval_ms: float
    new_request_ids: list[str]
    new_request_tokens: list[int]  # the tokens each new request computed in this step
    cached_requests: bytes  # the plan's CachedRequests (protos/worker.proto), serialized
    num_waiting: int = 0
    num_generated_tokens: int = 0  # tokens the engine generated since the previous record
    dropped_request_ids: list[str] = field(default_factory=list)  # finished or aborted before
    worker_ms: float = 0.0  # rank 0's time in Execute (the step's device work and its Python)
    worker_idle_ms: float = 0.0  # rank 0's host time before this step's launch (device idle)
    cuda_graph: bool = False  # the step replayed a captured decode graph
    piecewise_graph: bool = False  # the step replayed the graphs in pieces, attention between
    # From receiving the result of the step learned just before this plan was sent, to
    # sending it: the engine's own time on the device's critical path (0: sent without one).
    turnaround_ms: float = 0.0

    @property
    def scheduled_ids(self) -> tuple[str, ...]:
        """The requests it scheduled, in plan order."""
        cached = worker_pb2.CachedRequests.FromString(self.cached_requests)
        return (*self.new_request_ids, *cached.request_ids)

    @property
    def scheduled_tokens(self) -> list[int]:
        """The tokens each of scheduled_ids computed in this step."""
        cached = worker_pb2.CachedRequests.FromString(self.cached_requests)
        return [*self.new_request_tokens, *cached.num_scheduled_tokens]

    @property
    def scheduled(self) -> dict[str, int]:
        """Request id -> tokens computed in this step."""
        return dict(zip(self.scheduled_ids, self.scheduled_tokens, strict=True))

    def as_dict(self) -> dict:
        """Its fields as plain values, `scheduled` as the dict in place of the compact ones."""
        out = dataclasses.asdict(self)
        del out["new_request_tokens"], out["cached_requests"]
        out["scheduled"] = self.scheduled
        return out


@dataclass
class _SentStep:
    """A step sent to the workers whose result is not learned yet."""

    plan: worker_pb2.StepPlan
    sent: float  # time.monotonic() when it was sent
    num_waiting: int  # waiting requests when it was planned
    turnaround_ms: float  # see StepRecord


@dataclass
class _Learned:
    """A step learned by the scheduler whose outputs the sinks have not been sent yet."""

    step: _SentStep
    result: worker_pb2.StepResult
    received: float  # time.monotonic() when its result arrived
    requests: list[Request]  # what Scheduler.update answered: the live requests
    tokens: Sequence[int]  # and their tokens
    finished: list[Request]  # those of them that finished, in the same order
    sinks: list[OutputSink]  # each request's sink, taken before any request was dropped
    # Request id -> its token's logprobs (None: not asked); None when no request asked any.
    logprobs: dict[str, serving_pb2.TokenLogprobs | None] | None


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


def _by_sink(learned: _Learned) -> dict[OutputSink, tuple[list[Request], Sequence[int]]]:
    """A learned step's requests and tokens grouped by sink, each in step order, the sinks in
    the order of their first request (most steps have one sink: no grouping per request)."""
    requests, tokens, sinks = learned.requests, learned.tokens, learned.sinks
    if not sinks:
        return {}
    if sinks.count(sinks[0]) == len(sinks):
        return {sinks[0]: (requests, tokens)}
    groups: dict[OutputSink, tuple[list[Request], Sequence[int]]] = {}
    for request, token, sink in zip(requests, tokens, sinks, strict=True):
        group = groups.get(sink)
        if group is None:
            group = groups[sink] = ([], [])
        group[0].append(request)
        group[1].append(token)
    return groups


class WorkerFailed(RuntimeError):
    """A worker's Execute stream ended while the engine was running."""


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        workers: Sequence[WorkerClient],
        max_step_records: int = MAX_STEP_RECORDS,
        on_failure: Callable[["Engine"], None] | None = None,
    ) -> None:
        """on_failure: called (on the engine thread, no lock held) once a worker failed and the
        engine stopped stepping; it takes the unfinished requests with take_unfinished()."""
        self.scheduler = scheduler
        self.step_records: deque[StepRecord] = deque(maxlen=max_step_records)
        self.num_steps = 0
        self.num_graph_steps = 0  # of num_steps, those that replayed a whole CUDA graph
        self.num_piecewise_steps = 0  # of num_steps, those that replayed the graphs in pieces
        self.step_seconds = 0.0  # the steps' intervals summed (StepRecord.interval_ms)
        self.num_finished = 0
        self.num_generated_tokens = 0
        # (time.monotonic(), num_generated_tokens), one every _TOKEN_SAMPLE_S while tokens
        # come, the last THROUGHPUT_HORIZON_S of them.
        self._token_samples: deque[tuple[float, int]] = deque(
            maxlen=int(THROUGHPUT_HORIZON_S / _TOKEN_SAMPLE_S)
        )
        self._recorded_tokens = 0  # num_generated_tokens when the last step record was written
        self._last_learned: float | None = None  # time.monotonic() the newest step was learned
        # time.monotonic() the newest result arrived, until a plan is sent after it.
        self._received: float | None = None
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
        # Sink -> how many of _sinks' values it is: with one key, every request's sink.
        self._sink_counts: Counter[OutputSink] = Counter()
        # The newest learned step, until its outputs are sent (see the module doc).
        self._unsent: _Learned | None = None
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
            self._sink_counts[sink] += 1
            self._cond.notify()

    def adopt(self, completions: list[Request], sink: OutputSink) -> None:
        """Takes over a client request's unfinished completions from a failed replica, to be
        recomputed here (Scheduler.adopt); its sink keeps receiving its outputs, continuing
        from the tokens it already got. Raises as add_request does."""
        with self._cond:
            self._check_open()
            self.scheduler.adopt(completions)
            self._sinks[completions[0].group_id] = sink
            self._sink_counts[sink] += 1
            self._cond.notify()

    def take_unfinished(self) -> list[HeldRequest]:
        """Hands over every unfinished client request of a failed engine (its completions
        ready to be recomputed, and its sink); the engine takes no request afterwards."""
        with self._cond:
            assert self.error is not None, "only a failed engine hands its requests over"
            self._send_outputs()
            self._closed = True
            groups = self.scheduler.release_all()
            held = [(groups[request_id], sink) for request_id, sink in self._sinks.items()]
            self._sinks.clear()
            self._sink_counts.clear()
            return held

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the engine has failed: {self.error}")

    def abort(self, request_id: str, owner: str = "") -> bool:
        """Aborts a client request's unfinished completions; its sink gets their ends now (the
        tokens steps in flight sample for them are discarded). Whether it was found: a request
        of another owner is not (owner "" finds any)."""
        with self._cond:
            self._send_outputs()
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
            self._send_outputs()
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
        """Tokens learned in the last window_s seconds (at most THROUGHPUT_HORIZON_S), per
        second of the window; the window's start is known to _TOKEN_SAMPLE_S."""
        assert 0 < window_s <= THROUGHPUT_HORIZON_S, window_s
        since = time.monotonic() - window_s
        with self._cond:
            before = 0  # the count when the window began: 0 if no token was learned before
            for at, count in reversed(self._token_samples):
                if at <= since:
                    before = count
                    break
            return (self.num_generated_tokens - before) / window_s

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
                        self._send_outputs()
                        # Idle: the next plan follows no learned step (its turnaround is 0).
                        self._received = None
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
                with self._cond:
                    self._send_outputs()  # the step learned last, while the workers run
                step = in_flight.popleft()  # never empty here: see the wait above
                result = self._receive(step)
                self._received = time.monotonic()
                self._learn(step, result, self._received)
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

    def _learn(self, step: _SentStep, result: worker_pb2.StepResult, received: float) -> None:
        """Appends a step's tokens to the scheduler's requests; their outputs wait for
        _send_outputs."""
        ids = list(result.request_ids)
        # A request samples once a step: its id names its position's logprobs, where asked
        # (none asked: no map at all, the common case).
        logprobs = None
        if result.sampled_logprobs:
            logprobs = dict(zip(ids, unpack_logprobs(result), strict=True))
        with self._cond:
            assert self._unsent is None, "a learned step's outputs were never sent"
            # The result's own token field: the outputs copy it in C (see StepOutputsBuilder).
            requests, tokens, finished = self.scheduler.update(ids, result.token_ids)
            # Taken before any is dropped: the n completions of a request share one sink.
            if len(self._sink_counts) == 1:  # one frontend's requests only
                sinks = [*self._sink_counts] * len(requests)
            else:
                all_sinks = self._sinks
                sinks = [all_sinks[request.group_id] for request in requests]
            self.num_generated_tokens += len(requests)
            samples = self._token_samples
            if not samples or received - samples[-1][0] >= _TOKEN_SAMPLE_S:
                samples.append((received, self.num_generated_tokens))
            self._unsent = _Learned(
                step, result, received, requests, tokens, finished, sinks, logprobs
            )

    def _send_outputs(self) -> None:
        """Records the unsent learned step and sends each sink its tokens and ends in one
        message (under the lock)."""
        learned, self._unsent = self._unsent, None
        if learned is None:
            return
        self._record(learned)  # first: a client that got the step's outputs finds its record
        # Each sink's finished requests, in step order: only these few are looked at again.
        ended: dict[OutputSink, list[Request]] = {}
        for request in learned.finished:
            ended.setdefault(self._sinks[request.group_id], []).append(request)
        messages = []  # sent once every ended request is counted, as a sink may ask
        for sink, (requests, tokens) in _by_sink(learned).items():
            outputs = StepOutputsBuilder()
            logprobs = learned.logprobs
            if logprobs is not None:
                logprobs = [logprobs[request.request_id] for request in requests]
            outputs.tokens(requests, tokens, logprobs)
            for request in ended.get(sink, ()):
                outputs.finished(request)
                group = request.group_id
                if group not in self.scheduler.groups and group in self._sinks:
                    self._end(group)  # its last completion ended
            messages.append((sink, outputs.build()))
        for sink, message in messages:
            sink.send(message)

    def _end(self, request_id: str) -> None:
        """The client request's last completion ended (under the lock)."""
        sink = self._sinks.pop(request_id)
        self._sink_counts[sink] -= 1
        if not self._sink_counts[sink]:
            del self._sink_counts[sink]
        self.num_finished += 1

    def _send(self, plan: worker_pb2.StepPlan, num_waiting: int) -> None:
        now = time.monotonic()
        turnaround = 0.0 if self._received is None else (now - self._received) * 1e3
        self._received = None
        self._in_flight.append(_SentStep(plan, now, num_waiting, turnaround))
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
        and the step before it learned (the watchdog's clock, and the record's interval). The
        step before is recorded before this one is awaited (_send_outputs, then _receive)."""
        return step.sent if self._last_learned is None else max(step.sent, self._last_learned)

    def _record(self, learned: _Learned) -> None:
        """A learned step's record; its duration runs from sending its plan to learning it."""
        step, result, now = learned.step, learned.result, learned.received
        plan = step.plan
        self.num_steps += 1
        self.num_graph_steps += result.cuda_graph
        self.num_piecewise_steps += result.piecewise_graph
        since = self._charged_since(step)
        self.step_seconds += now - since
        self._last_learned = now
        self.step_records.append(
            StepRecord(
                step_id=plan.step_id,
                start=step.sent,
                duration_ms=(now - step.sent) * 1e3,
                interval_ms=(now - since) * 1e3,
                new_request_ids=[r.request_id for r in plan.new_requests],
                new_request_tokens=[r.num_scheduled_tokens for r in plan.new_requests],
                cached_requests=plan.cached_requests.SerializeToString(),
                num_waiting=step.num_waiting,
                num_generated_tokens=self.num_generated_tokens - self._recorded_tokens,
                dropped_request_ids=list(plan.finished_request_ids),
                worker_ms=result.execute_ms,
                worker_idle_ms=result.idle_ms,
                cuda_graph=result.cuda_graph,
                piecewise_graph=result.piecewise_graph,
                turnaround_ms=step.turnaround_ms,
            )
        )
        self._recorded_tokens = self.num_generated_tokens

    def _fail(self, error: str) -> None:
        """A worker failed: the engine steps no more. The failure handler takes its requests
        (to recompute them elsewhere); without one, every request still held is lost, and
        answered so."""
        self._watchdog_done.set()
        with self._cond:
            self._send_outputs()  # what was learned reaches its clients before the handover
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
            self._sink_counts.clear()
