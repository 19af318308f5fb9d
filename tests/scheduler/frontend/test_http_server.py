"""HttpServer: one port shared by several servers (SO_REUSEPORT), mutual TLS, and serving on
a thread of its own or on the caller's event loop."""

import asyncio
import socket
import ssl

import httpx
import pytest

from scheduler.config import ServerConfig
from scheduler.frontend.http_server import HttpServer
from scheduler.frontend.metrics import Metrics
from scheduler.frontend.openai_api import make_app
from tests.e2e.test_server_security import _self_signed
from tests.scheduler.frontend.scripted_backend import ScriptedBackend

WAIT_S = 10.0


def http_server(config: ServerConfig, tmp_path, model_name: str = "test-model") -> HttpServer:
    backend = ScriptedBackend()
    backend.model_name = model_name
    return HttpServer(make_app(backend, config, Metrics(model_name, str(tmp_path))), config)


def served_models(url: str, num_connections: int) -> set[str]:
    """The models named by /v1/models over num_connections new connections."""
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=WAIT_S, limits=no_reuse) as client:
        return {
            client.get(f"{url}/v1/models").json()["data"][0]["id"] for _ in range(num_connections)
        }


def test_servers_share_a_port_and_one_left_serves_it_alone(tmp_path):
    first = http_server(ServerConfig(http_port=0), tmp_path, "first")
    second = http_server(ServerConfig(http_port=first.port), tmp_path, "second")
    first.start()
    second.start()
    try:
        # The kernel spreads new connections over both; 64 all landing on one would be 2**-63.
        assert served_models(first.url, 64) == {"first", "second"}
        first.stop()
        assert served_models(second.url, 8) == {"second"}
    finally:
        first.stop()
        second.stop()


def test_a_port_taken_without_reuse_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot listen on 127.0.0.1:{port}"):
            http_server(ServerConfig(http_port=port), tmp_path)


def test_mutual_tls(tmp_path):
    server_cert, server_key = _self_signed(tmp_path, "server")
    client_cert, client_key = _self_signed(tmp_path, "client")
    config = ServerConfig(
        http_port=0,
        tls_cert_file=server_cert,
        tls_key_file=server_key,
        tls_client_ca_file=client_cert,
    )
    server = http_server(config, tmp_path)
    server.start()
    try:
        assert server.url.startswith("https://")
        trusted = ssl.create_default_context(cafile=server_cert)
        with pytest.raises(httpx.TransportError):  # no client certificate
            httpx.get(f"{server.url}/health", verify=trusted, timeout=WAIT_S)
        trusted.load_cert_chain(client_cert, client_key)
        assert httpx.get(f"{server.url}/health", verify=trusted, timeout=WAIT_S).status_code == 200
    finally:
        server.stop()


def test_serving_on_the_callers_event_loop(tmp_path):
    server = http_server(ServerConfig(http_port=0), tmp_path)

    async def serve_once() -> int:
        await server.astart()
        try:
            async with httpx.AsyncClient(timeout=WAIT_S) as client:
                return (await client.get(f"{server.url}/health")).status_code
        finally:
            await server.astop()

    assert asyncio.run(serve_once()) == 200
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/health", timeout=WAIT_S)
