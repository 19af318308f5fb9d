"""Runs a frontend's HTTP app (openai_api.make_app) on uvicorn at server.host:server.http_port.

Several frontend processes serve one port: each binds its own listening socket with
SO_REUSEPORT, and the kernel spreads new connections over them. TLS is the gRPC side's:
server.tls_cert_file and tls_key_file, and with tls_client_ca_file clients must present a
certificate that CA signed. The socket listens from construction on (a client that connects
before the server runs waits in the backlog); uvicorn serves it from start() (a thread of its
own, with its own event loop) or astart() (the running event loop: the one the Backend lives
on, as an asyncio Backend needs). Signals stay with the host process: stop() ends the server.
"""

import asyncio
import contextlib
import logging
import socket
import ssl
import threading

import uvicorn
from fastapi import FastAPI

from scheduler.config import ServerConfig

log = logging.getLogger(__name__)

_GRACEFUL_SHUTDOWN_S = 5.0  # open responses (streams) get this long to finish on stop
_BACKLOG = 2048


class _Server(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the process hosting the frontend owns its signals


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket at host:port that other processes may listen on too."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise RuntimeError(f"server.host {host!r}: {e}") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} (server.http_port): {e}") from e
    return sock


class HttpServer:
    """An app served at server_config.host:http_port; port is the one bound (http_port 0 takes
    a free one). TLS files are read here: a bad one fails construction."""

    def __init__(self, app: FastAPI, server_config: ServerConfig) -> None:
        self._socket = _listen(server_config.host, server_config.http_port)
        self.host = server_config.host
        self.port: int = self._socket.getsockname()[1]
        client_ca = server_config.tls_client_ca_file
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,  # the host process's logging stays as it is
            access_log=False,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
            ssl_certfile=server_config.tls_cert_file,
            ssl_keyfile=server_config.tls_key_file,
            ssl_ca_certs=client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if client_ca else ssl.CERT_NONE,
        )
        try:
            config.load()
        except BaseException:
            self._socket.close()
            raise
        self._server = _Server(config)
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self._server.config.is_ssl else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6
        return f"{scheme}://{host}:{self.port}"

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._socket])
        except Exception:
            log.exception("the HTTP server on port %d failed", self.port)
            raise

    def start(self) -> None:
        """Serves from a thread of its own (with an event loop of its own)."""
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name="http", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = _GRACEFUL_SHUTDOWN_S + 5) -> None:
        """Stops what start() started: no new connections; open responses get a few seconds."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._socket.close()

    async def astart(self) -> None:
        """Serves on the running event loop (as a task) until astop()."""
        self._task = asyncio.create_task(self._serve())

    async def astop(self) -> None:
        """Stops what astart() started, as stop() does."""
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        self._socket.close()
