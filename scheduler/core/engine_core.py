"""The engine core's gRPC server (protos/frontend.proto): the fleet of replicas behind one
EngineCore service that the frontends connect to.

    frontend 1 --Connect (AddRequest, abort, stop / StepOutputs)--+
    frontend 2 --Connect------------------------------------------+--> EngineCore --> Fleet
    any frontend --Abort, GetServerInfo, Scale (forwarded)--------+     (replicas, router)

The server listens from construction, so frontends connect while the workers load; start()
brings the replicas up, then every connected frontend (and any that connects later) is sent
the model it serves. While a failed replica recovers and none serves, every frontend is told
(its health is NOT_SERVING until one serves again). Each Connect stream is a FrontendLink, the
sink of the requests it adds; when the stream breaks, every request of that frontend is aborted
and its blocks freed.

A frontend that hangs breaks nothing: its process stopped, or its event loop blocked, its
connection stays open. Each frontend speaks at least every heartbeat.interval_s
(protos/heartbeat.py); a watchdog thread hangs up on one silent for heartbeat.timeout_s: its
requests are aborted and their blocks freed, as for one whose stream broke, and on_hung is told
its process (the cluster's core kills it, so that it takes no new client).

Only the cluster's frontends are served: with a secret (protos/cluster_secret.py; `pagedserve up`
draws one), every call without it is refused UNAUTHENTICATED before anything is decoded. The
launcher has the server listen on loopback, its frontends being on the core's node.

Admission: beyond scheduler.max_queued_requests requests waiting in the replicas' queues (all
frontends together), a new request is refused RESOURCE_EXHAUSTED before anything is built for
it. The count and the enqueueing are one step under a lock, so concurrent frontends cannot
overshoot the bound together.
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import grpc

from protos import frontend_pb2, frontend_pb2_grpc, serving_pb2
from protos.cluster_secret import ClusterSecretCheck
from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.core.fleet import Fleet, Placer
from scheduler.core.frontend_link import FrontendLink
from scheduler.core.replica import EngineConfigs, ReplicaSpec
from scheduler.core.request import Request
from scheduler.core.scheduler import RequestRefused
from scheduler.core.step_outputs import StepOutputsBuilder
from scheduler.request_decoding import RequestDecoding
from scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)

PID_METADATA = "frontend-pid"  # how a frontend names itself on its Connect stream
PORT_METADATA = "frontend-port"  # and its own Serving port (FrontendInfo.port)
_MAX_THREADS = 64  # a Connect stream holds one, each unary call one while it runs
_SERVES = "the engine core serves its cluster's frontends"  # a refusal's sentence
_WATCHDOG_POLL_S = 1.0  # the frontends' watchdog looks this often (or 4 times a timeout)


class _QueueFull(Exception):
    """A new request would exceed scheduler.max_queued_requests."""


class EngineCore:
    def __init__(
        self,
        model_name: str,
        host: str = "127.0.0.1",
        secret: str | None = None,
        heartbeat: Heartbeat = HEARTBEAT,
        on_hung: Callable[[int], None] | None = None,
    ) -> None:
        """Starts the EngineCore gRPC server on host, any free port (`address`). secret: the
        cluster secret every call must carry, or is refused UNAUTHENTICATED; None serves every
        call (a core inside a test's process). heartbeat.timeout_s: how long a frontend may be
        silent before it is taken for hung; on_hung(pid) is then called with its process id
        (after its requests are aborted), on the watchdog's thread."""
        self.model_name = model_name
        self.fleet: Fleet | None = None  # once start() has brought the replicas up
        self._model_info: serving_pb2.ModelInfoResponse | None = None
        self._max_queued_requests = 0  # scheduler.max_queued_requests, set by start()
        self._admission = threading.Lock()  # a queue count and the enqueue it allows
        self._links: list[FrontendLink] = []
        self._links_lock = threading.Lock()
        # The secret first: a call without it is refused before any byte of it is decoded.
        check = [ClusterSecretCheck(secret, _SERVES)] if secret is not None else []
        self._server = grpc.server(
            futures.ThreadPoolExecutor(_MAX_THREADS, "core"),
            interceptors=[*check, RequestDecoding()],
        )
        frontend_pb2_grpc.add_EngineCoreServicer_to_server(_Service(self), self._server)
        port = self._server.add_insecure_port(f"{host}:0")
        if port == 0:
            raise RuntimeError(f"the engine core cannot listen on {host}")
        self.address = f"{host}:{port}"
        self._server.start()
        self._heartbeat = heartbeat
        self._on_hung = on_hung
        self._stopping = threading.Event()
        self._watchdog = threading.Thread(
            target=self._watch_frontends, name="frontend-watchdog", daemon=True
        )
        self._watchdog.start()

    def start(
        self, specs: Sequence[ReplicaSpec], configs: EngineConfigs, placer: Placer | None = None
    ) -> None:
        """Brings the replicas up; then the frontends learn the model and serve."""
        fleet = Fleet(specs, configs, placer, on_serving=self._tell_serving)
        info = fleet.model_info
        model_info = serving_pb2.ModelInfoResponse(
            model=self.model_name,
            architecture=info.architecture,
            vocab_size=info.vocab_size,
            max_model_len=fleet.max_model_len,
            weight_bytes=info.weight_bytes,
            max_num_seqs=configs.scheduler.max_num_seqs,
        )
        with self._links_lock:
            self._max_queued_requests = configs.scheduler.max_queued_requests
            self.fleet, self._model_info = fleet, model_info
            for link in self._links:
                link.send_ready(model_info)

    def connect(self, link: FrontendLink) -> None:
        """A frontend's stream opened: it is told the model at once if the replicas serve."""
        with self._links_lock:
            self._links.append(link)
            if self._model_info is not None:
                link.send_ready(self._model_info)
                if not self.fleet.serving():
                    link.send_serving(False)
        log.info("frontend %d connected", link.pid)

    def _tell_serving(self, serving: bool) -> None:
        """Some replica serves again, or none does: every frontend is told (its health)."""
        log.warning("the fleet %s", "serves again" if serving else "has no replica serving")
        with self._links_lock:
            for link in self._links:
                link.send_serving(serving)

    def disconnect(self, link: FrontendLink) -> None:
        """A frontend's stream ended, or it hung: its requests are aborted (once)."""
        link.close()
        with self._links_lock:
            if link not in self._links:
                return
            self._links.remove(link)
            fleet = self.fleet
        aborted = fleet.abort_all(link) if fleet is not None else 0
        log.info("frontend %d disconnected; %d of its requests aborted", link.pid, aborted)

    def _watch_frontends(self) -> None:
        """The watchdog (its own thread): hangs up on every frontend silent for longer than
        heartbeat.timeout_s, until stop()."""
        timeout = self._heartbeat.timeout_s
        poll = min(timeout / 4, _WATCHDOG_POLL_S)
        looked = time.monotonic()
        while not self._stopping.wait(poll):
            now, last = time.monotonic(), looked
            looked = now
            if now - last > 2 * poll:
                # This process itself stood still (a long pause of every thread: the host, a
                # debugger): the frontends' messages wait unread, not missing. Look again once
                # the readers have had their turn.
                continue
            with self._links_lock:
                silent = [link for link in self._links if link.silent_for() > timeout]
            for link in silent:
                self._hang_up(link)

    def _hang_up(self, link: FrontendLink) -> None:
        """A frontend fell silent: its stream is ended, its requests aborted, on_hung told."""
        log.warning(
            "frontend %d sent nothing for %.1f s (heartbeat.timeout_s=%g): taken for hung",
            link.pid,
            link.silent_for(),
            self._heartbeat.timeout_s,
        )
        link.hang_up()
        self.disconnect(link)
        if self._on_hung is not None:
            self._on_hung(link.pid)

    def add(self, link: FrontendLink, msg: frontend_pb2.AddRequest) -> None:
        """Enqueues a frontend's request; a refusal is answered on its link."""
        link.num_requests += 1
        try:
            if self.fleet is None:
                raise RuntimeError("the model is still loading; retry shortly")
            with self._admission:
                self._check_queue()
                request = Request(
                    request_id=msg.request_id,
                    prompt_token_ids=list(msg.prompt_token_ids),
                    sampling_params=SamplingParams.from_proto(msg.params),
                    eos_token_ids=frozenset(msg.eos_token_ids),
                    max_model_len=self.fleet.max_model_len,
                    priority=msg.priority,
                    cache_salt=msg.cache_salt,
                    owner=msg.owner,
                )
                self.fleet.submit(request, link)
        except _QueueFull as e:
            self._refuse(link, msg.request_id, grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except RequestRefused as e:
            self._refuse(link, msg.request_id, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:  # an id in use (the frontend checked the parameters)
            self._refuse(link, msg.request_id, grpc.StatusCode.ALREADY_EXISTS, str(e))
        except RuntimeError as e:
            self._refuse(link, msg.request_id, grpc.StatusCode.UNAVAILABLE, str(e))

    def _check_queue(self) -> None:
        """Raises _QueueFull when scheduler.max_queued_requests requests wait already."""
        limit = self._max_queued_requests
        if limit and self.fleet.num_waiting() >= limit:
            raise _QueueFull(
                f"scheduler.max_queued_requests={limit} requests wait in the engine core "
                "already; retry later"
            )

    @staticmethod
    def _refuse(link: FrontendLink, request_id: str, code: grpc.StatusCode, why: str) -> None:
        outputs = StepOutputsBuilder()
        outputs.failed(request_id, code, why)
        link.send(outputs.build())

    def server_info(self) -> serving_pb2.ServerInfoResponse:
        """The fleet's state and the frontends connected now."""
        fleet = self.fleet
        info = fleet.server_info()
        info.model = self.model_name
        with self._links_lock:
            links = list(self._links)
        info.frontends.extend(
            serving_pb2.FrontendInfo(
                pid=link.pid,
                port=link.port,
                num_requests=link.num_requests,
                num_unfinished=fleet.num_unfinished(link),
            )
            for link in links
        )
        return info

    def stop(self) -> None:
        """Ends every frontend's stream, stops serving, then stops the replicas."""
        self._stopping.set()
        self._watchdog.join(timeout=10)
        with self._links_lock:
            links = list(self._links)
        for link in links:
            link.close()
        self._server.stop(grace=1.0).wait(timeout=10)
        if self.fleet is not None:
            self.fleet.stop()


class _Service(frontend_pb2_grpc.EngineCoreServicer):
    def __init__(self, core: EngineCore) -> None:
        self.core = core

    def Connect(self, request_iterator, context) -> Iterator[frontend_pb2.CoreMessage]:
        metadata = dict(context.invocation_metadata())
        pid, port = int(metadata.get(PID_METADATA, 0)), int(metadata.get(PORT_METADATA, 0))
        link = FrontendLink(pid, context.cancel, port)
        core = self.core
        core.connect(link)
        context.add_callback(link.close)  # the stream ended: the response loop below ends too
        reader = threading.Thread(
            target=self._read, args=(request_iterator, link), name="frontend-link", daemon=True
        )
        reader.start()
        try:
            while (message := link.next()) is not None:
                yield message
        finally:
            core.disconnect(link)

    def _read(self, request_iterator, link: FrontendLink) -> None:
        """Applies a frontend's messages in order, until its stream ends."""
        core = self.core
        try:
            for msg in request_iterator:
                link.heard()  # an empty message is the frontend's heartbeat
                for add in msg.add:
                    core.add(link, add)
                fleet = core.fleet
                if fleet is None:
                    continue  # nothing to abort or stop before the replicas serve
                for request_id in msg.abort:
                    fleet.abort(request_id)
                for stop in msg.stop:
                    fleet.stop_completion(stop.request_id, stop.index, stop.stop_str)
        except grpc.RpcError:
            pass  # the frontend went away: the stream's end handles it
        finally:
            link.close()

    def _fleet(self, context) -> Fleet:
        if self.core.fleet is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
        return self.core.fleet

    def Abort(self, request, context) -> serving_pb2.AbortResponse:
        fleet = self._fleet(context)
        return serving_pb2.AbortResponse(found=fleet.abort(request.request_id, request.owner))

    def GetServerInfo(self, request, context) -> serving_pb2.ServerInfoResponse:
        self._fleet(context)
        return self.core.server_info()

    def Scale(self, request, context) -> serving_pb2.ScaleResponse:
        fleet = self._fleet(context)
        if request.replicas < 1:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"replicas must be >= 1, got {request.replicas}"
            )
        if fleet.placer is None:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server cannot scale: it was started without a placer to start and stop "
                "workers (a cluster started by `pagedserve up` has one)",
            )
        try:
            return fleet.scale(request.replicas)
        except RuntimeError as e:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
