"""The replica fleet of the engine core: the replicas that serve, the router that picks one for a
new request, Scale, which places and brings up new replicas or drains surplus ones (they take
no new request, answer what they hold, then their workers stop), and recovery from a failed
worker.

Given a Placer (the cluster's places workers with Ray), the fleet can scale and restart failed
replicas; without one it serves the replicas it was started with, as long as they live.

Recovery, with nothing lost. A replica whose worker fails (Engine's on_failure, within moments
of the worker's death, idle or not):
  1. leaves routing at once and shows "failed";
  2. hands over its unfinished requests (waiting, running, swapped; each with every token its
     client got), which go to the replicas that serve, to be recomputed there as a preempted
     request is (prompt + outputs so far), keeping their sinks: each stream goes on from the
     token it got last, none twice, none missing (a step's tokens that were never learned were
     never sent, and are sampled again). A request's n completions stay together;
  3. is restarted ("recovering"): its workers are released and placed again, brought up, and
     it rejoins routing; failed attempts are retried with backoff, a bounded number of times.
While no replica serves, requests (handed over or new) wait in the fleet for one to be back;
should recovery give up with none serving, each is answered UNAVAILABLE with the reason. A new
request with no replica serving and none recovering is refused UNAVAILABLE at once.
"""

import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from protos import serving_pb2
from scheduler.core.engine import Engine, HeldRequest, OutputSink
from scheduler.core.replica import EngineConfigs, Replica, ReplicaSpec, ReplicaState
from scheduler.core.request import Request, RequestStatus
from scheduler.core.router import Router
from scheduler.core.scheduler import RequestRefused
from scheduler.core.step_outputs import StepOutputsBuilder

log = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.05  # how often a draining replica is checked for its last request
RESTART_ATTEMPTS = 5  # a failed replica's restarts before recovery gives up
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # the waits after failed attempts 1, 2, 3, 4
THROUGHPUT_WINDOW_S = 10.0  # GetServerInfo's generated tokens per second are over this window


class Placer(Protocol):
    """Starts and stops replicas' workers on the cluster's machines (cluster/ does it with Ray).
    A fleet given one can scale."""

    def place(self, replica_id: int) -> ReplicaSpec:
        """Starts the workers of a new replica; raises RuntimeError, with a sentence, when the
        cluster has no room for them (and then holds nothing for it)."""
        ...

    def release(self, replica_id: int, failed: bool = False) -> None:
        """Stops a replica's workers and frees the resources they held. failed: a worker
        failed, so they are killed at once rather than asked to stop (a hung one never
        answers)."""
        ...

    def nodes(self) -> list[serving_pb2.NodeInfo]:
        """The cluster's nodes, for GetServerInfo."""
        ...


@dataclasses.dataclass
class _Unplaced:
    """A client request that waits in the fleet for a serving replica: handed over by a failed
    one (its unfinished completions), or new (the request alone, before its n forks)."""

    completions: list[Request]
    sink: OutputSink
    new: bool

    def unfinished(self) -> list[Request]:
        """Every completion the client still waits for (a new request's forks included)."""
        if not self.new:
            return self.completions
        request = self.completions[0]
        return [request, *(request.fork(i) for i in range(1, request.sampling_params.n))]


class Fleet:
    def __init__(
        self,
        specs: Sequence[ReplicaSpec],
        configs: EngineConfigs,
        placer: Placer | None = None,
        on_serving: Callable[[bool], None] | None = None,
    ) -> None:
        """Brings up the replicas (their workers are placed already) and routes to them.
        on_serving(serving) is called (under the fleet's lock: it must not block) whenever
        whether some replica serves changes."""
        if not specs:
            raise ValueError("a fleet needs at least one replica")
        self.placer = placer
        self._configs = configs
        # Replaced, never changed in place (readers take a snapshot), under _membership, which
        # also makes routing a request and enqueueing it one step that draining or a failure
        # cannot split. Invariant: the router routes exactly the replicas whose state is
        # SERVING; every unfinished client request is held by one engine or by _unplaced.
        self.replicas: list[Replica] = []
        self._membership = threading.Lock()
        self._scaling = threading.Lock()  # one Scale at a time
        self._next_replica_id = len(specs)
        self._drains: list[threading.Thread] = []
        self._restarts: list[threading.Thread] = []
        self._restarting: set[int] = set()  # replicas whose restart goes on (_membership)
        self._unplaced: list[_Unplaced] = []  # oldest first, under _membership
        self._on_serving = on_serving
        self._was_serving = True  # what on_serving was told last (under _membership)
        self._closed = threading.Event()
        # Gone engines' totals (drained replicas', failed ones' replaced): _totals; the Counter
        # is replaced, as above, never changed in place.
        self._retired: Counter[str] = Counter()
        self._num_failures = 0  # replica failures, under _membership
        self._num_recovered = 0  # requests handed over by failed replicas, under _membership
        # Replica id -> why its workers failed last (its engine's error), under _membership.
        self._last_failure: dict[int, str] = {}
        replicas: list[Replica] = []
        try:
            for replica_id, spec in enumerate(specs):
                replicas.append(Replica(replica_id, spec, configs, self._replica_failed))
        except BaseException:
            for replica in replicas:
                replica.stop()
            raise
        self.model_info, self.max_model_len = replicas[0].model_info, replicas[0].max_model_len
        with self._membership:
            self.router = Router(
                [r.engine.scheduler for r in replicas], [r.engine.lock for r in replicas]
            )
            self.replicas = replicas
            for replica in replicas:  # one that failed while the others came up
                if replica.engine.error is not None:
                    self._fail(replica)

    def submit(self, request: Request, sink: OutputSink) -> None:
        """Routes a new request to a serving replica and enqueues it there (what
        Engine.add_request raises, it raises). With none serving, it waits in the fleet for a
        recovering one; with none recovering either, RuntimeError says why."""
        with self._membership:
            replica_id = self.router.route(request)
            if replica_id is not None:
                self._engine(replica_id).add_request(request, sink)
                return
            if not self._restarting:
                raise RuntimeError(self._none_serving())
            self._unplaced.append(_Unplaced([request], sink, new=True))

    def _engine(self, replica_id: int) -> Engine:
        return next(r.engine for r in self.replicas if r.replica_id == replica_id)

    def abort(self, request_id: str, owner: str = "") -> bool:
        """Aborts a client request wherever it runs or waits, if owner ("" = any) submitted
        it; whether it was found."""
        with self._membership:  # not between replicas while a failed one hands it over
            for i, held in enumerate(self._unplaced):
                first = held.completions[0]
                if first.group_id == request_id and (not owner or first.owner == owner):
                    del self._unplaced[i]
                    self._end(held, RequestStatus.FINISHED_ABORTED)
                    return True
            return any(replica.engine.abort(request_id, owner) for replica in self.replicas)

    def stop_completion(self, request_id: str, index: int, stop_str: str) -> bool:
        """Finishes a completion whose text reached a stop string (Engine.stop_completion)."""
        with self._membership:
            for held in self._unplaced:
                if held.completions[0].group_id == request_id:
                    return self._stop_unplaced(held, index, stop_str)
            return any(r.engine.stop_completion(request_id, index, stop_str) for r in self.replicas)

    def _stop_unplaced(self, held: _Unplaced, index: int, stop_str: str) -> bool:
        """stop_completion of a request waiting in the fleet (under _membership)."""
        completion = next((c for c in held.completions if c.index == index), None)
        if completion is None:
            return False
        held.completions.remove(completion)
        if not held.completions:
            self._unplaced.remove(held)
        completion.stop_reason = stop_str
        completion.status = RequestStatus.FINISHED_STOPPED
        outputs = StepOutputsBuilder()
        outputs.finished(completion)
        held.sink.send(outputs.build())
        return True

    def abort_all(self, sink: OutputSink) -> int:
        """Aborts every request of one sink, on every replica and waiting here; how many."""
        with self._membership:
            mine = [held for held in self._unplaced if held.sink is sink]
            self._unplaced = [held for held in self._unplaced if held.sink is not sink]
            for held in mine:
                self._end(held, RequestStatus.FINISHED_ABORTED)
        return len(mine) + sum(replica.engine.abort_all(sink) for replica in self.replicas)

    def num_waiting(self) -> int:
        """Requests queued in every replica, not yet scheduled (read without the engines'
        locks: a snapshot, for admission)."""
        return sum(len(replica.engine.scheduler.waiting) for replica in self.replicas)

    def num_unfinished(self, sink: OutputSink) -> int:
        unplaced = sum(held.sink is sink for held in list(self._unplaced))
        return unplaced + sum(replica.engine.num_unfinished(sink) for replica in self.replicas)

    @staticmethod
    def _end(held: _Unplaced, status: RequestStatus) -> None:
        """Ends every completion of a request waiting in the fleet; its sink is told."""
        outputs = StepOutputsBuilder()
        for completion in held.unfinished():
            completion.status = status
            outputs.finished(completion)
        held.sink.send(outputs.build())

    def scale(self, num_replicas: int) -> serving_pb2.ScaleResponse:
        """Brings the number of replicas that serve (or recover) to num_replicas (>= 1; needs a
        placer): places and brings up new ones, or sets the newest serving ones draining;
        answers once the new ones serve. Raises RuntimeError when a new replica cannot be placed
        (those placed before it serve)."""
        with self._scaling:
            kept = [r for r in self.replicas if r.state is not ReplicaState.DRAINING]
            added = [self._add_replica() for _ in range(num_replicas - len(kept))]
            with self._membership:
                serving = [r for r in self.replicas if r.state is ReplicaState.SERVING]
                surplus = max(len(kept) + len(added) - num_replicas, 0)
                newest = sorted(serving, key=lambda r: r.replica_id, reverse=True)[:surplus]
                draining = sorted(newest, key=lambda r: r.replica_id)
                for replica in draining:
                    self.router.remove(replica.replica_id)
                    replica.state = ReplicaState.DRAINING
                held = {r.replica_id: r.engine.num_unfinished() for r in draining}
            for replica in draining:
                log.info(
                    "replica %d drains %d requests", replica.replica_id, held[replica.replica_id]
                )
                self._start(self._drains, self._retire, replica, "drain")
            return serving_pb2.ScaleResponse(
                serving=[r.replica_id for r in self.replicas if r.state is ReplicaState.SERVING],
                added=added,
                draining=[r.replica_id for r in draining],
                num_draining_requests=sum(held.values()),
            )

    def _start(self, threads: list[threading.Thread], target, replica: Replica, name: str):
        """Runs target(replica) on a thread of its own, kept in threads (for stop() to join)
        with those still running: one per recovery or drain would otherwise pile up."""
        thread = threading.Thread(target=target, args=(replica,), name=name, daemon=True)
        thread.start()
        threads[:] = [*(t for t in threads if t.is_alive()), thread]

    def _add_replica(self) -> int:
        """Places a new replica, brings it up and routes requests to it; returns its id."""
        replica_id = self._next_replica_id
        self._next_replica_id += 1
        replica = self._bring_up(replica_id)
        with self._membership:
            self.replicas = [*self.replicas, replica]
            self._serve(replica)
        return replica_id

    def _bring_up(self, replica_id: int) -> Replica:
        """Places a replica's workers and brings them up (released again if that fails)."""
        spec = self.placer.place(replica_id)
        try:
            replica = Replica(replica_id, spec, self._configs, self._replica_failed)
        except BaseException:
            self.placer.release(replica_id)
            raise
        log.info("replica %d serves on %s", replica_id, ", ".join(spec.worker_addresses))
        return replica

    def _serve(self, replica: Replica) -> None:
        """A replica in self.replicas joins routing and takes the requests waiting for one
        (under _membership); one that failed meanwhile goes to recovery instead."""
        if replica.engine.error is not None:
            self._fail(replica)
            return
        self.router.add(replica.replica_id, replica.engine.scheduler, replica.engine.lock)
        self._tell_serving()
        self._place_unplaced()

    def _tell_serving(self) -> None:
        """Calls on_serving when whether some replica serves has changed (under _membership)."""
        serving = self._any_serving()
        if serving != self._was_serving and self._on_serving is not None:
            self._on_serving(serving)
        self._was_serving = serving

    def _replica_failed(self, replica: Replica) -> None:
        """A worker of the replica failed (its engine's on_failure, on the engine thread)."""
        with self._membership:
            if replica in self.replicas:  # else it is still coming up: _serve finds it failed
                self._fail(replica)

    def _fail(self, replica: Replica) -> None:
        """Takes a failed replica out of routing, places its unfinished requests on the
        replicas that serve (or holds them until one does) and starts its restart (unless it
        was draining, or there is no placer). Under _membership; once per failure."""
        if replica.state in (ReplicaState.FAILED, ReplicaState.RECOVERING):
            return
        restart = replica.state is ReplicaState.SERVING and self.placer is not None
        replica.state = ReplicaState.RECOVERING if restart else ReplicaState.FAILED
        if self.router.routes(replica.replica_id):
            self.router.remove(replica.replica_id)
        if restart:
            self._restarting.add(replica.replica_id)
        held: list[HeldRequest] = replica.engine.take_unfinished()
        self._num_failures += 1
        self._last_failure[replica.replica_id] = replica.engine.error
        self._num_recovered += len(held)
        log.warning(
            "replica %d failed (%s); %d of its requests are recomputed elsewhere",
            replica.replica_id,
            replica.engine.error,
            len(held),
        )
        self._tell_serving()
        self._unplaced += [_Unplaced(completions, sink, new=False) for completions, sink in held]
        self._place_unplaced()
        if restart:
            self._start(self._restarts, self._restart, replica, "restart")
        else:  # a draining one's drain finds it empty and stops it
            self._fail_unplaced_if_none_serves()

    def _place_unplaced(self) -> None:
        """Routes every request waiting in the fleet to a serving replica, oldest first, while
        one serves (under _membership)."""
        while self._unplaced:
            held = self._unplaced[0]
            replica_id = self.router.route(held.completions[0])
            if replica_id is None:
                return
            del self._unplaced[0]
            engine = self._engine(replica_id)
            try:
                if held.new:
                    engine.add_request(held.completions[0], held.sink)
                else:
                    engine.adopt(held.completions, held.sink)
            except RequestRefused as e:  # it can never fit this replica
                self._answer(held, grpc.StatusCode.INVALID_ARGUMENT, str(e))
            except ValueError as e:  # its id is in use there
                self._answer(held, grpc.StatusCode.ALREADY_EXISTS, str(e))

    def _restart(self, replica: Replica) -> None:
        """Stops a failed replica's workers and places new ones, until it serves again or
        RESTART_ATTEMPTS have failed (each logged; backoff between them). The replica shows
        "recovering" meanwhile, "failed" if recovery gives up."""
        replica_id = replica.replica_id
        replica.stop()
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            log.info("replica %d: restart attempt %d of %d", replica_id, attempt, RESTART_ATTEMPTS)
            try:
                self.placer.release(replica_id, failed=True)
                restarted = self._bring_up(replica_id)
            except Exception as e:
                log.warning("replica %d: restart attempt %d failed: %s", replica_id, attempt, e)
                backoff = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S)) - 1]
                if attempt < RESTART_ATTEMPTS and not self._closed.wait(backoff):
                    continue
                break
            with self._membership:
                closed = self._closed.is_set()  # stop() already stopped the replicas it saw
                if not closed:
                    self.replicas = [restarted if r is replica else r for r in self.replicas]
                    self._retired = self._retired + _totals(replica.engine)  # counters go on
                    self._restarting.discard(replica_id)
                    self._serve(restarted)
            if closed:
                restarted.stop()
            else:
                log.info("replica %d recovered after %d attempt(s)", replica_id, attempt)
            return
        log.error("replica %d: recovery gave up after %d attempts", replica_id, attempt)
        with self._membership:
            replica.state = ReplicaState.FAILED
            self._restarting.discard(replica_id)
            self._fail_unplaced_if_none_serves()

    def _fail_unplaced_if_none_serves(self) -> None:
        """With no replica serving and none restarting, the requests waiting in the fleet are
        answered UNAVAILABLE (under _membership)."""
        if self._any_serving() or self._restarting:
            return
        unplaced, self._unplaced = self._unplaced, []
        for held in unplaced:
            self._answer(held, grpc.StatusCode.UNAVAILABLE, self._none_serving())

    def _none_serving(self) -> str:
        states = ", ".join(f"replica {r.replica_id} {r.state.value}" for r in self.replicas)
        return f"no replica serves ({states or 'none left'}); retry once one is back"

    @staticmethod
    def _answer(held: _Unplaced, code: grpc.StatusCode, why: str) -> None:
        """Ends a request waiting in the fleet unanswered (the error ends all its completions)."""
        outputs = StepOutputsBuilder()
        outputs.failed(held.completions[0].group_id, code, why)
        held.sink.send(outputs.build())

    def _retire(self, replica: Replica) -> None:
        """Waits until a draining replica has answered every request it holds (or handed them
        over, failing), then stops its engine and its workers (unless the whole fleet stops
        first: stop() takes it down)."""
        while replica.engine.num_unfinished():
            if self._closed.wait(_DRAIN_POLL_S):
                return
        engine = replica.engine
        replica.stop()
        # Its workers and placement group go before it leaves the list: once GetServerInfo no
        # longer shows it, nothing of it is left.
        self.placer.release(replica.replica_id)
        with self._membership:
            self.replicas = [r for r in self.replicas if r is not replica]
            self._retired = self._retired + _totals(engine)
        log.info("replica %d drained and stopped", replica.replica_id)

    def step_records(self) -> list[dict]:
        """Every replica's recent steps, as dicts (replica by replica)."""
        return [
            record.as_dict()
            for replica in self.replicas
            for record in list(replica.engine.step_records)
        ]

    def serving(self) -> bool:
        """Whether some replica serves (takes requests), as on_serving was told last: a change
        shows here once on_serving has heard of it."""
        return self._was_serving  # no lock: on_serving's callees call this (a bool's read)

    def _any_serving(self) -> bool:
        return any(r.state is ReplicaState.SERVING for r in self.replicas)

    def server_info(self) -> serving_pb2.ServerInfoResponse:
        """Replicas, counters and nodes, as GetServerInfo answers (model and frontends are the
        core's to fill)."""
        replicas, retired = self.replicas, self._retired  # snapshots
        engines = [replica.engine for replica in replicas]
        infos = [replica.info(THROUGHPUT_WINDOW_S) for replica in replicas]
        for info in infos:
            info.last_failure = self._last_failure.get(info.replica_id, "")
        return serving_pb2.ServerInfoResponse(
            replicas=infos,
            num_steps=retired["steps"] + sum(e.num_steps for e in engines),
            num_finished_requests=retired["finished"] + sum(e.num_finished for e in engines),
            num_generated_tokens=retired["generated"]
            + sum(e.num_generated_tokens for e in engines),
            nodes=self.placer.nodes() if self.placer is not None else [],
            generated_tokens_per_s=sum(info.generated_tokens_per_s for info in infos),
            throughput_window_s=THROUGHPUT_WINDOW_S,
            num_replica_failures=self._num_failures,
            num_recovered_requests=self._num_recovered,
            num_graph_steps=retired["graph_steps"] + sum(e.num_graph_steps for e in engines),
            num_piecewise_steps=retired["piecewise_steps"]
            + sum(e.num_piecewise_steps for e in engines),
            step_seconds=retired["step_seconds"] + sum(e.step_seconds for e in engines),
        )

    def stop(self) -> None:
        """Stops every replica's engine (draining and failed ones too); the placer stops the
        workers."""
        self._closed.set()
        for thread in (*self._drains, *self._restarts):
            thread.join(timeout=10)
        for replica in self.replicas:
            replica.stop()


def _totals(engine: Engine) -> Counter:
    """An engine's server-wide counters, kept in the fleet's totals once the engine goes (its
    replica drained, or replaced after a failure), so that they never go back."""
    return Counter(
        steps=engine.num_steps,
        graph_steps=engine.num_graph_steps,
        piecewise_steps=engine.num_piecewise_steps,
        step_seconds=engine.step_seconds,
        finished=engine.num_finished,
        generated=engine.num_generated_tokens,
    )
