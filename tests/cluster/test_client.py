"""The client retries UNAVAILABLE: a server that answers UNAVAILABLE twice (as one that is
still loading would) is asked again, and the third answer reaches the caller. Async clients
share one connection unless each asks for its own. spread() sends Generates to the frontends'
own ports in turn, and keeps the shared port where they do not connect; a frontend that failed
a call sits out a while, and a rerouted call whose id is still in use is sent again."""

import asyncio
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster import client as client_module
from cluster.client import AsyncClient, Client, frontend_addresses
from protos import serving_pb2, serving_pb2_grpc
from tests.conftest import free_port


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


class Frontend(serving_pb2_grpc.ServingServicer):
    """Stands for one frontend: counts the Generates it served; the shared port's also names
    the others' own ports in GetServerInfo. While `down` it fails every Generate UNAVAILABLE
    (as one whose engine core is gone); it refuses the next `in_use` Generates ALREADY_EXISTS
    (as the core does while a gone frontend's copy of the request is not aborted yet)."""

    def __init__(self, ports: list[int] = ()) -> None:
        self.generates = 0
        self.ports = ports
        self.down = False
        self.in_use = 0
        self.refused = 0

    def Generate(self, request, context):
        if self.down:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the engine core is gone")
        if self.in_use > 0:
            self.in_use -= 1
            self.refused += 1
            context.abort(grpc.StatusCode.ALREADY_EXISTS, f"{request.request_id!r} is in use")
        self.generates += 1
        yield serving_pb2.GenerateResponse(request_id=request.request_id, token_ids=[1])

    def GetServerInfo(self, request, context):
        frontends = [serving_pb2.FrontendInfo(pid=i + 1, port=p) for i, p in enumerate(self.ports)]
        return serving_pb2.ServerInfoResponse(frontends=frontends)


def _with_async_client(port: int, body):
    """body(an AsyncClient of the port) on an event loop of its own; the client closed after."""

    async def run():
        client = AsyncClient(f"127.0.0.1:{port}")
        try:
            return await body(client)
        finally:
            await client.close()

    return asyncio.run(run())


async def _four_generates(client: AsyncClient) -> None:
    for _ in range(4):
        assert [r.token_ids[0] async for r in client.generate([5, 6])] == [1]


def _serve(servicer: Frontend) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def test_frontend_addresses_name_the_frontends_own_ports_on_the_servers_host():
    info = serving_pb2.ServerInfoResponse(
        frontends=[serving_pb2.FrontendInfo(port=p) for p in (7002, 0, 7001, 7002)]
    )
    assert frontend_addresses("example.org:50051", info) == ["example.org:7001", "example.org:7002"]
    assert frontend_addresses("[::1]:50051", info) == ["[::1]:7001", "[::1]:7002"]
    one = serving_pb2.ServerInfoResponse(frontends=[serving_pb2.FrontendInfo(port=7001)])
    assert frontend_addresses("example.org:50051", one) == []


@dataclass
class _Three:
    """Frontends b and c on ports of their own, and the shared port's frontend naming them."""

    b: Frontend
    c: Frontend
    shared: Frontend
    servers: tuple  # shared, b's, c's
    port: int  # the shared one
    port_b: int


@pytest.fixture
def three():
    b, c = Frontend(), Frontend()
    (server_b, port_b), (server_c, port_c) = _serve(b), _serve(c)
    shared = Frontend([port_b, port_c])
    server, port = _serve(shared)
    servers = (server, server_b, server_c)
    yield _Three(b, c, shared, servers, port, port_b)
    for one in servers:
        one.stop(0)


def test_spread_sends_generates_to_each_frontend_in_turn(three):
    with Client(f"127.0.0.1:{three.port}") as client:
        assert client.spread(timeout=20) == 2
        for i in range(6):
            assert [r.token_ids[0] for r in client.generate([5, 6], request_id=str(i))] == [1]

    async def spread_async(client: AsyncClient) -> None:
        assert await client.spread(timeout=20) == 2
        await _four_generates(client)

    _with_async_client(three.port, spread_async)
    assert (three.b.generates, three.c.generates, three.shared.generates) == (5, 5, 0)


def test_spread_keeps_the_shared_port_where_the_frontends_ports_do_not_connect():
    shared = Frontend([free_port(), free_port()])  # nothing listens there
    server, port = _serve(shared)
    try:
        with Client(f"127.0.0.1:{port}") as client:
            assert client.spread(timeout=0.5) == 1
            assert len(list(client.generate([5, 6]))) == 1

        async def spread_async(client: AsyncClient) -> int:
            spread = await client.spread(timeout=0.5)
            assert len([r async for r in client.generate([5, 6])]) == 1
            return spread

        assert _with_async_client(port, spread_async) == 1
    finally:
        server.stop(0)
    assert shared.generates == 2


def test_a_spread_call_whose_frontend_is_gone_goes_to_the_shared_port(three):
    """A frontend that goes after spread(): a call sent to its port fails UNAVAILABLE before any
    answer, goes to the shared port instead, and the gone frontend leaves the turns."""
    shared_server, server_b, server_c = three.servers
    with Client(f"127.0.0.1:{three.port}") as client:
        assert client.spread(timeout=20) == 2
        server_c.stop(0).wait()
        for _ in range(4):
            assert [r.token_ids[0] for r in client.generate([5, 6])] == [1]

    async def spread_then_lose_b(client: AsyncClient) -> None:
        three.shared.ports = [three.port_b, three.port]  # b and the shared port's own frontend
        assert await client.spread(timeout=20) == 2
        server_b.stop(0).wait()
        await _four_generates(client)

    _with_async_client(three.port, spread_then_lose_b)
    assert three.c.generates == 0  # gone before any call reached it
    assert three.b.generates + three.shared.generates == 8  # every call answered, once
    # b answered at most the sync client's first call: once c failed a call, c left the turns
    # and one frontend's port is no spread (the shared port's stub takes every call).
    assert three.b.generates <= 1


def test_a_frontend_that_failed_a_call_takes_its_turns_again_after_a_while(three, monkeypatch):
    """b fails calls UNAVAILABLE (its core gone a moment): it sits out REJOIN_AFTER_S, the
    shared port taking every call meanwhile (one frontend's turns are no spread), then b and c
    take turns again."""
    monkeypatch.setattr(client_module, "REJOIN_AFTER_S", 0.5)
    with Client(f"127.0.0.1:{three.port}") as client:
        assert client.spread(timeout=20) == 2
        three.b.down = True
        for _ in range(4):
            assert [r.token_ids[0] for r in client.generate([5, 6])] == [1]
        assert three.b.generates == 0 and three.c.generates <= 1
        three.b.down = False
        time.sleep(0.6)
        before = (three.b.generates, three.c.generates, three.shared.generates)
        for _ in range(4):
            assert [r.token_ids[0] for r in client.generate([5, 6])] == [1]
    after = (three.b.generates, three.c.generates, three.shared.generates)
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2, 0]
    assert sum(after) == 8  # every call answered, once


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rerouted_call_is_sent_again_while_its_id_is_still_in_use(three, mode):
    """Both frontends fail UNAVAILABLE; the shared port refuses the rerouted call ALREADY_EXISTS
    twice (the core still holds the gone frontend's copy), then serves it: one answer."""
    three.b.down = three.c.down = True
    three.shared.in_use = 2
    if mode == "sync":
        with Client(f"127.0.0.1:{three.port}") as client:
            assert client.spread(timeout=20) == 2
            got = [r.token_ids[0] for r in client.generate([5, 6], request_id="mine")]
    else:

        async def body(client: AsyncClient) -> list[int]:
            assert await client.spread(timeout=20) == 2
            return [r.token_ids[0] async for r in client.generate([5, 6], request_id="mine")]

        got = _with_async_client(three.port, body)
    assert got == [1]
    assert (three.shared.refused, three.shared.generates) == (2, 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_id_in_use_for_good_reaches_the_caller_after_the_wait(three, monkeypatch, mode):
    """A rerouted call whose id stays in use (another live request of the caller's) is refused
    ALREADY_EXISTS after REROUTE_WAIT_S, not sent again for ever."""
    monkeypatch.setattr(client_module, "REROUTE_WAIT_S", 0.4)
    three.b.down = three.c.down = True
    three.shared.in_use = 10**6
    began = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        if mode == "sync":
            with Client(f"127.0.0.1:{three.port}") as client:
                assert client.spread(timeout=20) == 2
                list(client.generate([5, 6], request_id="mine"))
        else:

            async def body(client: AsyncClient) -> None:
                assert await client.spread(timeout=20) == 2
                [r async for r in client.generate([5, 6], request_id="mine")]

            _with_async_client(three.port, body)
    assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert 0.4 <= time.monotonic() - began < 15
    assert 3 <= three.shared.refused <= 12 and three.shared.generates == 0
