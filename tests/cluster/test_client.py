"""The client retries UNAVAILABLE: a call made while the server is still starting succeeds."""

import socket
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cluster.client import Client


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_call_before_the_server_is_up_is_retried():
    port = _free_port()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("pagedserve.serving.Serving", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            assert client.health(timeout=20) == "SERVING"
    finally:
        starter.cancel()
        server.stop(0)
