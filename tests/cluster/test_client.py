"""The client retries UNAVAILABLE: a server that answers UNAVAILABLE twice (as one that is
still loading would) is asked again, and the third answer reaches the caller. Async clients
share one connection unless each asks for its own."""

import asyncio
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import AsyncClient, Client
from protos import serving_pb2, serving_pb2_grpc


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


class PeerRecorder(serving_pb2_grpc.ServingServicer):
    def __init__(self) -> None:
        self.peers: list[str] = []

    async def GetModelInfo(self, request, context):
        self.peers.append(context.peer())  # the client's address and port: its connection
        return serving_pb2.ModelInfoResponse(model="m")


def test_async_clients_share_one_connection_unless_each_asks_for_its_own():
    async def connections(own_connection: bool) -> int:
        server = grpc.aio.server()
        recorder = PeerRecorder()
        serving_pb2_grpc.add_ServingServicer_to_server(recorder, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        clients = [AsyncClient(f"127.0.0.1:{port}", own_connection=own_connection) for _ in "abc"]
        try:
            for client in clients:
                await client.model_info(timeout=20)
        finally:
            for client in clients:
                await client.close()
            await server.stop(0)
        return len(set(recorder.peers))

    assert asyncio.run(connections(own_connection=False)) == 1
    assert asyncio.run(connections(own_connection=True)) == 3
