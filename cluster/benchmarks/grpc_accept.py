"""How fast a grpc.aio server starts new calls while its event loop is busy, as a frontend's is
while it streams: a server process whose loop runs --callbacks callbacks of --callback-us each
per turn (the streams' work), and a client that opens --calls server-streaming calls at once
(a burst of new requests) and waits for each call's one message.

    python -m cluster.benchmarks.grpc_accept [--calls 256] [--callbacks 0 50 100]
        [--callback-us 50] [--servers 1]

Reports, for each --callbacks: the time until every call answered, the loop's turns in that
time, turns per call started, and the most calls started in one turn. --servers N: N servers
in the server process share the port (SO_REUSEPORT) and the client opens 8 connections (each
kept to one server), to see whether more accept loops start calls faster.
"""

import argparse
import asyncio
import collections
import multiprocessing
import time

import grpc

from protos import serving_pb2, serving_pb2_grpc

TIMEOUT_S = 120.0
CONNECTIONS = 8  # of the client, with --servers > 1


class _Turns:
    """The server loop's turn count, and the turn in which each call started."""

    def __init__(self) -> None:
        self.turn = 0
        self.starts: list[int] = []


class _Service(serving_pb2_grpc.ServingServicer):
    def __init__(self, turns: _Turns) -> None:
        self.turns = turns

    async def Generate(self, request, context):
        self.turns.starts.append(self.turns.turn)
        yield serving_pb2.GenerateResponse(request_id=request.request_id)

    async def GetModelInfo(self, request, context):
        """The turns the calls so far took: (first start, last start, most in one turn),
        carried in the model name, and resets the count."""
        starts, self.turns.starts = self.turns.starts, []
        most = max(collections.Counter(starts).values())
        return serving_pb2.ModelInfoResponse(model=f"{min(starts)} {max(starts)} {most}")


def _busy(us: float) -> None:
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def _load(turns: _Turns, callbacks: int, us: float) -> None:
    """Every turn of the loop runs `callbacks` callbacks of `us` each."""
    loop = asyncio.get_running_loop()
    while True:
        for _ in range(callbacks):
            loop.call_soon(_busy, us)
        turns.turn += 1
        await asyncio.sleep(0)


async def _serve(servers: int, callbacks: int, us: float, port, stop) -> None:
    turns = _Turns()
    started, bound = [], 0
    for _ in range(servers):
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        serving_pb2_grpc.add_ServingServicer_to_server(_Service(turns), server)
        bound = server.add_insecure_port(f"127.0.0.1:{bound}")
        await server.start()
        started.append(server)
    load = asyncio.get_running_loop().create_task(_load(turns, callbacks, us))
    port.put(bound)
    await asyncio.get_running_loop().run_in_executor(None, stop.wait, TIMEOUT_S)
    load.cancel()
    for server in started:
        await server.stop(0)


def _server_process(servers: int, callbacks: int, us: float, port, stop) -> None:
    asyncio.run(_serve(servers, callbacks, us, port, stop))


async def _burst(port: int, calls: int, connections: int) -> tuple[float, str]:
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection each
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(connections)
    ]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), TIMEOUT_S)
        stubs = [serving_pb2_grpc.ServingStub(channel) for channel in channels]

        async def one(i: int) -> None:
            msg = serving_pb2.GenerateRequest(request_id=str(i))
            async for _ in stubs[i % connections].Generate(msg, timeout=TIMEOUT_S):
                pass

        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(calls)))
        took = time.perf_counter() - start
        info = await stubs[0].GetModelInfo(serving_pb2.ModelInfoRequest(), timeout=TIMEOUT_S)
        return took, info.model
    finally:
        for channel in channels:
            await channel.close()


def run(calls: int, callbacks: int, callback_us: float, servers: int = 1) -> dict:
    """One burst against a fresh server process: seconds until every call answered, the loop's
    turns between the first and the last call's start, per call, and the most in one turn."""
    ctx = multiprocessing.get_context("spawn")
    port, stop = ctx.Queue(), ctx.Event()
    args = (servers, callbacks, callback_us, port, stop)
    proc = ctx.Process(target=_server_process, args=args, daemon=True)
    proc.start()
    try:
        connections = 1 if servers == 1 else CONNECTIONS
        took, turns = asyncio.run(_burst(port.get(timeout=TIMEOUT_S), calls, connections))
    finally:
        stop.set()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    first, last, most = map(int, turns.split())
    return {
        "seconds": took,
        "turns": last - first,
        "turns_per_call": (last - first) / max(calls - 1, 1),
        "most_in_a_turn": most,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=256)
    parser.add_argument("--callbacks", type=int, nargs="+", default=[0, 50, 100])
    parser.add_argument("--callback-us", type=float, default=50.0)
    parser.add_argument("--servers", type=int, default=1)
    args = parser.parse_args()
    if min(args.calls, args.servers) < 1 or min(args.callbacks) < 0 or args.callback_us < 0:
        parser.error("--calls and --servers must be at least 1, the others at least 0")
    print(
        f"| callbacks a turn (x {args.callback_us:g} us) | servers | {args.calls} calls took (s) "
        "| turns | turns a call | most calls started in a turn |"
    )
    print("|---|---|---|---|---|---|")
    for callbacks in args.callbacks:
        r = run(args.calls, callbacks, args.callback_us, args.servers)
        print(
            f"| {callbacks} | {args.servers} | {r['seconds']:.3f} | {r['turns']} | "
            f"{r['turns_per_call']:.1f} | {r['most_in_a_turn']} |"
        )


if __name__ == "__main__":
    main()
