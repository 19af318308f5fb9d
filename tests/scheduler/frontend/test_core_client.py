"""CoreClient against a scripted engine core (a real gRPC server whose Connect stream the test
drives): the core's messages reach the frontend's event loop however busy it is."""

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from protos import frontend_pb2, frontend_pb2_grpc
from scheduler.frontend.core_client import CoreClient

WAIT_S = 10.0
STEPS = 16
BUSY_S = 1.0  # a turn of the frontend's loop much longer than the core's steps


class ScriptedCore(frontend_pb2_grpc.EngineCoreServicer):
    """Sends what the test puts on `outgoing` (None ends the stream); `added` is set once the
    frontend's first request came."""

    def __init__(self) -> None:
        self.outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self.added = threading.Event()

    def Connect(self, request_iterator, context):
        threading.Thread(target=self._read, args=(request_iterator,), daemon=True).start()
        while (message := self.outgoing.get()) is not None:
            yield message

    def _read(self, request_iterator) -> None:
        with contextlib.suppress(grpc.RpcError):
            for message in request_iterator:
                if message.add:
                    self.added.set()


@contextlib.contextmanager
def scripted_core() -> Iterator[tuple[ScriptedCore, str]]:
    core = ScriptedCore()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    frontend_pb2_grpc.add_EngineCoreServicer_to_server(core, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield core, f"127.0.0.1:{port}"
    finally:
        core.outgoing.put(None)
        server.stop(grace=None)


@contextlib.asynccontextmanager
async def client_with_request(address: str, core: ScriptedCore):
    """A started CoreClient and the queue of its request "r", which the core has received."""
    client = CoreClient(address, on_ready=lambda info: None)
    await client.start()
    try:
        outputs = client.add(frontend_pb2.AddRequest(request_id="r", prompt_token_ids=[1]))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, core.added.wait, WAIT_S)
        yield client, outputs
    finally:
        await client.close()


def step(token: int) -> frontend_pb2.CoreMessage:
    """One step's outputs: one token of request "r"."""
    return frontend_pb2.CoreMessage(
        outputs=frontend_pb2.StepOutputs(request_ids=["r"], indices=[0], token_ids=[token])
    )


def test_a_busy_loop_takes_every_step_that_came_meanwhile_in_its_next_turn():
    """While the loop is busy for a long turn, the core sends STEPS steps; in the next turns
    the request's queue holds them all, in order, as one CoreOutputs. (Read on the loop, a gRPC
    stream yields one message every few turns, so a frontend whose turns outgrow the core's
    steps fell further behind at every step.)"""

    async def run(address: str, core: ScriptedCore) -> list[list[int]]:
        async with client_with_request(address, core) as (_, outputs):
            for token in range(STEPS):
                core.outgoing.put(step(token))
            time.sleep(BUSY_S)  # the loop's long turn: nothing else runs on it meanwhile
            for _ in range(2):
                await asyncio.sleep(0)
            taken = []
            while not outputs.empty():
                taken.append([token for _, token, _ in outputs.get_nowait().tokens])
            return taken

    with scripted_core() as (core, address):
        assert asyncio.run(run(address, core)) == [list(range(STEPS))]


def test_the_end_of_the_stream_comes_after_every_message_it_brought():
    """The core's last messages and then its end: the request gets its token, then the
    UNAVAILABLE end (core_gone), and the client is closed."""

    async def run(address: str, core: ScriptedCore):
        async with client_with_request(address, core) as (client, outputs):
            core.outgoing.put(step(7))
            core.outgoing.put(None)
            await asyncio.wait_for(client.closed.wait(), WAIT_S)
            first = await asyncio.wait_for(outputs.get(), WAIT_S)
            last = await asyncio.wait_for(outputs.get(), WAIT_S)
            return first, last, client.connected, client.num_requests

    with scripted_core() as (core, address):
        first, last, connected, num_requests = asyncio.run(run(address, core))
    assert [token for _, token, _ in first.tokens] == [7] and not first.core_gone
    assert last.core_gone and last.finished[0].error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert not connected and num_requests == 0


def two_requests_step(r: int, w: int, w_ends: bool = False) -> frontend_pb2.CoreMessage:
    """One step: a token of request "r" and one of "w" (and w's end)."""
    outputs = frontend_pb2.StepOutputs(request_ids=["r", "w"], indices=[0, 0], token_ids=[r, w])
    if w_ends:
        outputs.finished.add(request_id="w", index=0, finish_reason="length")
    return frontend_pb2.CoreMessage(outputs=outputs)


def test_a_request_shown_only_at_its_end_wakes_only_then():
    """wake_at_end: while another request gets each step's token, the held one's queue stays
    empty; its end brings every token it was held, in order, with the end, in one CoreOutputs.
    If the core goes first, what was held comes with the UNAVAILABLE end."""

    async def run(address: str, core: ScriptedCore, core_goes: bool):
        async with client_with_request(address, core) as (client, shown):
            held = client.add(frontend_pb2.AddRequest(request_id="w"), wake_at_end=True)
            for token in range(3):
                core.outgoing.put(two_requests_step(token, 10 + token))
            got = []
            while len(got) < 3:  # every step reached the loop
                outputs = await asyncio.wait_for(shown.get(), WAIT_S)
                got += [token for _, token, _ in outputs.tokens]
            empty_meanwhile = held.empty()
            if core_goes:
                core.outgoing.put(None)
            else:
                core.outgoing.put(two_requests_step(3, 13, w_ends=True))
            end = await asyncio.wait_for(held.get(), WAIT_S)
            return got, empty_meanwhile, end, held.empty()

    for core_goes in (False, True):
        with scripted_core() as (core, address):
            got, empty_meanwhile, end, nothing_after = asyncio.run(run(address, core, core_goes))
        assert got == [0, 1, 2] and empty_meanwhile and nothing_after
        held_tokens = [10, 11, 12] if core_goes else [10, 11, 12, 13]
        assert [token for _, token, _ in end.tokens] == held_tokens
        assert end.core_gone == core_goes
        code = end.finished[0].error.code if core_goes else None
        assert code == (grpc.StatusCode.UNAVAILABLE.value[0] if core_goes else None)
        assert len(end.finished) == 1
