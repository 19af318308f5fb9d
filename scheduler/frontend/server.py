"""A frontend process's server: the Serving gRPC service (with grpc.health.v1, reflection, token
auth and TLS) on server.host:server.port and the OpenAI-compatible HTTP API (with /metrics) on
server.host:server.http_port, both over one CoreBackend connected to the engine core.

Several frontends listen on the same ports (SO_REUSEPORT: the kernel spreads connections over
them), each also on a gRPC port of its own that GetServerInfo names (a client spreads its calls
over those: cluster.client); their request metrics meet in one multiprocess directory
(scheduler.frontend.metrics).
The server answers from the start, NOT_SERVING while the tokenizer loads and the core brings
the replicas up, SERVING once both are done; NOT_SERVING again if the core's stream breaks.
It runs its own event loop on a thread, so a host process (a Ray actor) stays free.
"""

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import serving_pb2, serving_pb2_grpc
from scheduler.auth import TokenAuthInterceptor
from scheduler.config import INT32_MAX, ServerConfig
from scheduler.frontend.core_backend import CoreBackend
from scheduler.frontend.core_client import serving_changes
from scheduler.frontend.grpc_service import ServingService
from scheduler.frontend.http_server import HttpServer
from scheduler.frontend.metrics import Metrics
from scheduler.frontend.openai_api import make_app
from scheduler.frontend.tokenizer import Tokenizer
from scheduler.request_decoding import AsyncRequestDecoding

log = logging.getLogger(__name__)

# How long a call may wait in gRPC for this server to take it. gRPC's default, 30 s, answers a
# call not taken by then CANCELLED ("CANCELLED", never seen by the frontend, counted nowhere);
# the frontend takes one call a turn of its event loop, so under a burst (1000 Generate calls
# at once on the 2-core box while it streams hundreds of others: about 25 taken a second) the
# tail of the burst waited longer than that (the soak's unexplained CANCELLED rounds). Calls
# wait their turn instead, then the frontend's admission decides (server.max_concurrent_requests,
# scheduler.max_queued_requests); a client's deadline still ends the wait (DEADLINE_EXCEEDED).
MAX_UNTAKEN_CALL_S = 600
# How many calls may wait in gRPC for this server to take them. gRPC's defaults (a soft 1000,
# past which it refuses a growing share of new calls at random, and a hard 3000) answer a
# refused call CANCELLED with no sentence, unseen by the frontend: a burst of 4096 requests
# from 16 connections over 8 frontends (each connection's calls go to one frontend) lost some
# that way. No count of waiting calls is refused here: every call waits its turn as above, and
# the frontend's admission is the count bound, answered with a sentence.
MAX_PENDING_CALLS = INT32_MAX

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
_START_TIMEOUT_S = 30.0


class FrontendServer:
    def __init__(
        self,
        config: ServerConfig,
        core_addresses: Sequence[str],
        load_tokenizer: Callable[[], Tokenizer],
        model_name: str,
        metrics_dir: str,
        core_secret: str | None = None,
        ready_wait_s: float = 0.0,
    ) -> None:
        """Listens (config.port and config.http_port, or free ports where 0: `port` and
        `http_port` say which) and connects to the engine cores (core_addresses: one, or several
        that requests are routed over: CoreSet); loads the tokenizer (load_tokenizer())
        in the background. metrics_dir: the server's frontends' shared metrics directory.
        core_secret: the cluster secret the core demands (protos/cluster_secret.py).
        ready_wait_s: how long a call before the model is known waits for it (CoreBackend)."""
        # This process detokenizes a few tokens of one request at a time: the tokenizers
        # library's thread pool costs more than it saves there, and its threads take CPU from
        # the event loop (BENCHMARKS.md "Frontend streaming"). Off, unless the environment says
        # otherwise (the library reads it at each call).
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self._config = config
        self._core_secret = core_secret
        self._ready_wait_s = ready_wait_s
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(core_addresses, load_tokenizer, model_name, metrics_dir),
            name="frontend",
            daemon=True,
        )
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT_S):
            raise RuntimeError(f"the frontend did not start within {_START_TIMEOUT_S} s")
        if self._start_error is not None:
            raise self._start_error

    def wait_ready(self, timeout: float) -> None:
        """Returns once the frontend serves; raises TimeoutError after timeout seconds."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the frontend on port {self.port} was not ready in {timeout} s")
        if self._start_error is not None:
            raise self._start_error

    def call_on_loop(self, fn: Callable[[], object]) -> object:
        """fn() on the server's event loop thread (what must run there: a profiler follows the
        thread that enables it); returns its result."""

        async def call() -> object:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(_START_TIMEOUT_S)

    def streamed(self) -> tuple[int, float | None, float | None]:
        """What benchmarks read to tell frontends apart: the output tokens sent so far, when the
        last message to a client went and when the last outputs came from the cores
        (time.monotonic(), None before any), read on the event loop (where they change)."""

        def read() -> tuple[int, float | None, float | None]:
            return (*self.metrics.streamed(), self.backend.core.last_outputs_at)

        return self.call_on_loop(read)

    def _run(
        self,
        core_addresses: Sequence[str],
        load_tokenizer: Callable[[], Tokenizer],
        model_name: str,
        metrics_dir: str,
    ) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start(core_addresses, model_name, metrics_dir))
        except BaseException as e:
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        self._watch = self._loop.create_task(self._serve_when_ready(load_tokenizer))
        self._loop.run_forever()

    async def _start(
        self, core_addresses: Sequence[str], model_name: str, metrics_dir: str
    ) -> None:
        cfg = self._config
        tokens = cfg.tokens()
        # Authentication first: a client without a token learns nothing of the decoding.
        auth = TokenAuthInterceptor(tokens, frozenset(cfg.admin_tokens)) if tokens else None
        self._server = grpc.aio.server(
            interceptors=[auth, AsyncRequestDecoding()] if auth else [AsyncRequestDecoding()],
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.so_reuseport", 1),
                ("grpc.server_max_unrequested_time_in_server", MAX_UNTAKEN_CALL_S),
                ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
                ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
            ],
        )
        self.backend = CoreBackend(
            model_name,
            core_addresses,
            cfg.max_concurrent_requests,
            self._core_secret,
            ready_wait_s=self._ready_wait_s,
        )
        self.metrics = Metrics(model_name, metrics_dir)
        serving_pb2_grpc.add_ServingServicer_to_server(
            ServingService(self.backend, self.metrics, auth), self._server
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        self.port = self._listen(cfg.port)
        self.address = f"{cfg.host}:{self.port}"
        # The same service on a port of this frontend alone: the shared port's connections go
        # to whichever frontend the kernel picks; a client told every frontend's own port
        # (GetServerInfo) can spread its calls evenly (cluster.client).
        self.own_port = self._listen(0)
        await self._server.start()
        self._http = HttpServer(make_app(self.backend, cfg, self.metrics), cfg)
        self.http_port = self._http.port
        await self._http.astart()
        await self._set_health(False)
        await self.backend.core.start(self.own_port)

    def _listen(self, port: int) -> int:
        """Adds server.host:port (0: a free one) to the gRPC server, with TLS when configured;
        returns the port."""
        cfg = self._config
        address = f"{cfg.host}:{port}"
        if cfg.tls_cert_file is None:
            bound = self._server.add_insecure_port(address)
        else:
            client_ca = cfg.read("tls_client_ca_file")
            credentials = grpc.ssl_server_credentials(
                [(cfg.read("tls_key_file"), cfg.read("tls_cert_file"))],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            bound = self._server.add_secure_port(address, credentials)
        if bound == 0:
            raise RuntimeError(f"cannot listen on {address}")
        return bound

    async def _serve_when_ready(self, load_tokenizer: Callable[[], Tokenizer]) -> None:
        """SERVING once the tokenizer is loaded and the core has sent the model; NOT_SERVING
        while no replica of the core serves (one recovers), and once the core's stream ends."""
        loop = asyncio.get_running_loop()
        try:
            with futures.ThreadPoolExecutor(max_workers=1) as pool:
                tokenizer = await loop.run_in_executor(pool, load_tokenizer)
        except Exception as e:  # wait_ready() raises it
            log.exception("loading the tokenizer")
            self._start_error = e
            self._ready.set()
            return
        self.backend.set_tokenizer(tokenizer)
        await self.backend.became_ready.wait()
        await self._set_health(True)
        self._ready.set()
        log.info("frontend serving on %s", self.address)
        core = self.backend.core
        async for _ in serving_changes(core.closed, core.serving_changed):
            await self._set_health(core.serving and not core.closed.is_set())
        await self._set_health(False)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)

    def stop(self) -> None:
        """Stops serving (streams in flight end) and closes the core's stream."""

        async def _stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self._http.astop()
            await self._server.stop(grace=1.0)
            await self.backend.core.close()
            self._watch.cancel()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=15)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
