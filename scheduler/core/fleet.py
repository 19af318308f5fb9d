"""The replica fleet of the engine core: the replicas that serve, the router that picks one for a
new request, and Scale, which places and brings up new replicas or drains surplus ones (they
take no new request, answer what they hold, then their workers stop).

Given a Placer (the cluster's places workers with Ray), the fleet can scale; without one it
serves the replicas it was started with.
"""

import dataclasses
import logging
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from protos import serving_pb2
from scheduler.core.engine import Engine, OutputSink
from scheduler.core.replica import EngineConfigs, Replica, ReplicaSpec
from scheduler.core.request import Request
from scheduler.core.router import Router

log = logging.getLogger(__name__)

_DRAIN_POLL_S = 0.05  # how often a draining replica is checked for its last request
THROUGHPUT_WINDOW_S = 10.0  # GetServerInfo's generated tokens per second are over this window


class Placer(Protocol):
    """Starts and stops replicas' workers on the cluster's machines (cluster/ does it with Ray).
    A fleet given one can scale."""

    def place(self, replica_id: int) -> ReplicaSpec:
        """Starts the workers of a new replica; raises RuntimeError, with a sentence, when the
        cluster has no room for them (and then holds nothing for it)."""
        ...

    def release(self, replica_id: int) -> None:
        """Stops a replica's workers and frees the resources they held."""
        ...

    def nodes(self) -> list[serving_pb2.NodeInfo]:
        """The cluster's nodes, for GetServerInfo."""
        ...


class Fleet:
    def __init__(
        self,
        specs: Sequence[ReplicaSpec],
        configs: EngineConfigs,
        placer: Placer | None = None,
    ) -> None:
        """Brings up the replicas (their workers are placed already) and routes to them."""
        if not specs:
            raise ValueError("a fleet needs at least one replica")
        self.placer = placer
        self._configs = configs
        # Replaced, never changed in place (readers take a snapshot), under _membership, which
        # also makes routing a request and enqueueing it one step that draining cannot split.
        self.replicas: list[Replica] = []
        self._membership = threading.Lock()
        self._scaling = threading.Lock()  # one Scale at a time
        self._next_replica_id = len(specs)
        self._drains: list[threading.Thread] = []
        self._closed = threading.Event()
        self._retired: Counter[str] = Counter()  # drained replicas' totals (replaced, as above)
        try:
            for replica_id, spec in enumerate(specs):
                self.replicas.append(Replica(replica_id, spec, configs))
        except BaseException:
            self.stop()
            raise
        first = self.replicas[0]
        self.model_info, self.max_model_len = first.model_info, first.max_model_len
        self.router = Router(
            [r.engine.scheduler for r in self.replicas], [r.engine.lock for r in self.replicas]
        )

    def submit(self, request: Request, sink: OutputSink) -> None:
        """Routes a new request to a serving replica and enqueues it there (what
        Engine.add_request raises, it raises)."""
        with self._membership:
            replica_id = self.router.route(request)
            self._engine(replica_id).add_request(request, sink)

    def _engine(self, replica_id: int) -> Engine:
        return next(r.engine for r in self.replicas if r.replica_id == replica_id)

    def abort(self, request_id: str, owner: str = "") -> bool:
        """Aborts a client request wherever it runs, if owner ("" = any) submitted it; whether
        it was found."""
        return any(replica.engine.abort(request_id, owner) for replica in self.replicas)

    def stop_completion(self, request_id: str, index: int, stop_str: str) -> bool:
        """Finishes a completion whose text reached a stop string (Engine.stop_completion)."""
        return any(r.engine.stop_completion(request_id, index, stop_str) for r in self.replicas)

    def abort_all(self, sink: OutputSink) -> int:
        """Aborts every request of one sink, on every replica; how many."""
        return sum(replica.engine.abort_all(sink) for replica in self.replicas)

    def num_waiting(self) -> int:
        """Requests queued in every replica, not yet scheduled (read without the engines'
        locks: a snapshot, for admission)."""
        return sum(len(replica.engine.scheduler.waiting) for replica in self.replicas)

    def num_unfinished(self, sink: OutputSink) -> int:
        return sum(replica.engine.num_unfinished(sink) for replica in self.replicas)

    def scale(self, num_replicas: int) -> serving_pb2.ScaleResponse:
        """Brings the number of serving replicas to num_replicas (>= 1; needs a placer): places
        and brings up new ones, or sets the newest draining; answers once the new ones serve.
        Raises RuntimeError when a new replica cannot be placed (those placed before it serve)."""
        with self._scaling:
            serving = [r for r in self.replicas if not r.draining]
            added = [self._add_replica() for _ in range(num_replicas - len(serving))]
            with self._membership:
                draining = sorted(serving, key=lambda r: r.replica_id)[num_replicas:]
                for replica in draining:
                    self.router.remove(replica.replica_id)
                    replica.draining = True
                held = {r.replica_id: r.engine.num_unfinished() for r in draining}
            for replica in draining:
                log.info(
                    "replica %d drains %d requests", replica.replica_id, held[replica.replica_id]
                )
                drain = threading.Thread(
                    target=self._retire, args=(replica,), name="drain", daemon=True
                )
                drain.start()
                self._drains.append(drain)
            return serving_pb2.ScaleResponse(
                serving=[r.replica_id for r in self.replicas if not r.draining],
                added=added,
                draining=[r.replica_id for r in draining],
                num_draining_requests=sum(held.values()),
            )

    def _add_replica(self) -> int:
        """Places a new replica, brings it up and routes requests to it; returns its id."""
        replica_id = self._next_replica_id
        self._next_replica_id += 1
        spec = self.placer.place(replica_id)
        try:
            replica = Replica(replica_id, spec, self._configs)
        except BaseException:
            self.placer.release(replica_id)
            raise
        with self._membership:
            self.replicas = [*self.replicas, replica]
            self.router.add(replica_id, replica.engine.scheduler, replica.engine.lock)
        log.info("replica %d serves on %s", replica_id, ", ".join(spec.worker_addresses))
        return replica_id

    def _retire(self, replica: Replica) -> None:
        """Waits until a draining replica has answered every request it holds, then stops its
        engine and its workers (unless the whole fleet stops first: stop() takes it down)."""
        while replica.engine.num_unfinished():
            if self._closed.wait(_DRAIN_POLL_S):
                return
        engine = replica.engine
        replica.stop()
        with self._membership:
            self.replicas = [r for r in self.replicas if r is not replica]
            self._retired = self._retired + Counter(
                steps=engine.num_steps,
                finished=engine.num_finished,
                generated=engine.num_generated_tokens,
            )
        self.placer.release(replica.replica_id)
        log.info("replica %d drained and stopped", replica.replica_id)

    def step_records(self) -> list[dict]:
        """Every replica's recent steps, as dicts (replica by replica)."""
        return [
            dataclasses.asdict(record)
            for replica in self.replicas
            for record in list(replica.engine.step_records)
        ]

    def server_info(self) -> serving_pb2.ServerInfoResponse:
        """Replicas, counters and nodes, as GetServerInfo answers (model and frontends are the
        core's to fill)."""
        replicas, retired = self.replicas, self._retired  # snapshots
        engines = [replica.engine for replica in replicas]
        infos = [replica.info(THROUGHPUT_WINDOW_S) for replica in replicas]
        return serving_pb2.ServerInfoResponse(
            replicas=infos,
            num_steps=retired["steps"] + sum(e.num_steps for e in engines),
            num_finished_requests=retired["finished"] + sum(e.num_finished for e in engines),
            num_generated_tokens=retired["generated"]
            + sum(e.num_generated_tokens for e in engines),
            nodes=self.placer.nodes() if self.placer is not None else [],
            generated_tokens_per_s=sum(info.generated_tokens_per_s for info in infos),
            throughput_window_s=THROUGHPUT_WINDOW_S,
        )

    def stop(self) -> None:
        """Stops every replica's engine (draining ones too); the placer stops the workers."""
        self._closed.set()
        for drain in self._drains:
            drain.join(timeout=10)
        for replica in self.replicas:
            replica.stop()
