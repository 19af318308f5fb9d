"""The client retries UNAVAILABLE: a server that answers UNAVAILABLE twice (as one that is
still loading would) is asked again, and the third answer reaches the caller."""

from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import Client


class FlakyHealth(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self.calls = 0

    def Check(self, request, context):
        self.calls += 1
        if self.calls <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "still loading")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def test_unavailable_is_retried():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = FlakyHealth()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}") as client:
            assert client.health(timeout=20) == "SERVING"
        assert servicer.calls == 3
    finally:
        server.stop(0)
