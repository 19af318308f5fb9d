"""A frontend's connection to the engine core: one Connect stream (protos/frontend.proto) and
the unary calls it forwards, on the frontend's event loop.

    add(AddRequest) -> the request's queue      ...      Connect stream      engine core
    abort(id), stop(id, index, stop_str)  --> batched into one FrontendMessage per loop turn -->
    request queues <-- a StepOutputs split by request (one CoreOutputs each) <-- per step

The stream speaks at least every heartbeat.interval_s (an empty message when nothing is queued):
the core takes a frontend silent for heartbeat.timeout_s for hung (protos/heartbeat.py). The
messages come from this event loop, so a loop that stops turning falls silent too.

A request is registered until the core has ended all its completions (or refused it), not
until its client leaves: the core's answer to an abort still finds it, and its id cannot be
reused on this frontend before the core has freed it.
"""

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from protos import frontend_pb2, frontend_pb2_grpc, serving_pb2
from protos.cluster_secret import secret_metadata
from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.core.engine_core import PID_METADATA
from scheduler.frontend.backend import ServingError

log = logging.getLogger(__name__)

CORE_GONE = "the engine core is gone; the server is shutting down or failed"


async def serving_changes(closed: asyncio.Event, changed: asyncio.Event) -> AsyncIterator[None]:
    """Yields each time `changed` is set (clearing it first), until `closed` is set: a core's
    (or a CoreSet's) serving_changed and closed, for whoever re-reads its `serving`."""
    ended = asyncio.ensure_future(closed.wait())
    try:
        while not closed.is_set():
            changed_now = asyncio.ensure_future(changed.wait())
            try:
                await asyncio.wait((ended, changed_now), return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when the watcher is cancelled: no waiter is left behind
                changed_now.cancel()
            changed.clear()
            yield
    finally:
        ended.cancel()


@dataclass
class CoreOutputs:
    """One request's share of one core message: (index, token, logprobs) per new token (logprobs
    None where not asked), then the completions that ended. core_gone: the core's stream broke
    (finished holds the request's end, UNAVAILABLE)."""

    tokens: list[tuple[int, int, serving_pb2.TokenLogprobs | None]] = field(default_factory=list)
    finished: list[frontend_pb2.Finished] = field(default_factory=list)
    core_gone: bool = False


@dataclass
class _Registered:
    outputs: asyncio.Queue  # of CoreOutputs
    unfinished: int  # completions the core has not ended


class CoreClient:
    """Create and use it on one event loop; start() opens the stream."""

    def __init__(
        self,
        address: str,
        on_ready: Callable[[serving_pb2.ModelInfoResponse], None],
        secret: str | None = None,
        heartbeat: Heartbeat = HEARTBEAT,
    ) -> None:
        """secret: the cluster secret, carried by every call to the core. heartbeat: how often
        the stream speaks when the frontend has nothing to send."""
        self.address = address
        self._heartbeat = heartbeat
        self._secret_metadata = secret_metadata(secret)
        self._on_ready = on_ready
        self.connected = False  # the stream is open (the core may not be ready yet)
        self.closed = asyncio.Event()  # set when the stream has ended
        # Whether some replica of the core serves (the core says when it changes); set()
        # and cleared by the server that watches it, which re-reads `serving`.
        self.serving = True
        self.serving_changed = asyncio.Event()
        self._requests: dict[str, _Registered] = {}
        # time.monotonic() when the core's last message of outputs came (None before any).
        self.last_outputs_at: float | None = None
        self._outgoing = frontend_pb2.FrontendMessage()
        self._wake = asyncio.Event()
        self._closing = False

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address)
        self._stub = frontend_pb2_grpc.EngineCoreStub(self._channel)
        self._call = self._stub.Connect(
            self._send_loop(),
            metadata=((PID_METADATA, str(os.getpid())), *self._secret_metadata),
            wait_for_ready=True,
        )
        self.connected = True
        loop = asyncio.get_running_loop()
        self._receiver = loop.create_task(self._receive_loop())
        self._beater = loop.create_task(self._beat())

    @property
    def num_requests(self) -> int:
        """Requests sent to the core that it has not ended yet (nor refused)."""
        return len(self._requests)

    def holds(self, request_id: str) -> bool:
        """Whether the request is sent to this core and not yet ended by it."""
        return request_id in self._requests

    def add(self, msg: frontend_pb2.AddRequest) -> asyncio.Queue:
        """Sends a request to the core; returns the queue its CoreOutputs arrive on."""
        if not self.connected:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, CORE_GONE)
        if msg.request_id in self._requests:
            raise ServingError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {msg.request_id!r} is already in use"
            )
        n = msg.params.n if msg.params.HasField("n") else 1
        registered = self._requests[msg.request_id] = _Registered(asyncio.Queue(), n)
        self._outgoing.add.append(msg)
        self._wake.set()
        return registered.outputs

    def abort(self, request_id: str) -> None:
        """Asks the core to end every completion of a request (their ends still arrive)."""
        self._outgoing.abort.append(request_id)
        self._wake.set()

    def stop(self, request_id: str, index: int, stop_str: str) -> None:
        """Tells the core that a completion's text reached a stop string."""
        self._outgoing.stop.add(request_id=request_id, index=index, stop_str=stop_str)
        self._wake.set()

    async def abort_by_id(self, request_id: str, owner: str) -> bool:
        """Abort of the Serving API, for a request of owner ("" = any) on any frontend."""
        abort = frontend_pb2.AbortById(request_id=request_id, owner=owner)
        return (await self._unary(self._stub.Abort, abort)).found

    async def server_info(self) -> serving_pb2.ServerInfoResponse:
        return await self._unary(self._stub.GetServerInfo, serving_pb2.ServerInfoRequest())

    async def scale(self, replicas: int) -> serving_pb2.ScaleResponse:
        return await self._unary(self._stub.Scale, serving_pb2.ScaleRequest(replicas=replicas))

    async def _unary(self, method, request):
        """A call to the core; its refusals reach the client with their code and sentence."""
        try:
            return await method(request, metadata=self._secret_metadata)
        except grpc.aio.AioRpcError as e:
            raise ServingError(e.code(), e.details()) from None

    async def close(self) -> None:
        """Ends the stream (the core aborts what this frontend still holds) and the channel."""
        self._closing = True
        self._wake.set()
        self._beater.cancel()
        if self.connected:
            self._call.cancel()
            await asyncio.wait([self._receiver], timeout=10)
        await self._channel.close()

    async def _send_loop(self):
        """What was queued since the last turn of the loop, as one message (an empty one when
        only the heartbeat woke it)."""
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            message, self._outgoing = self._outgoing, frontend_pb2.FrontendMessage()
            yield message

    async def _beat(self) -> None:
        """Wakes the send loop every heartbeat.interval_s: the stream speaks at least that
        often, busy or idle."""
        while not self._closing:
            await asyncio.sleep(self._heartbeat.interval_s)
            self._wake.set()

    async def _receive_loop(self) -> None:
        try:
            async for message in self._call:
                if message.HasField("ready"):
                    self._on_ready(message.ready)
                elif message.HasField("serving"):
                    self.serving = message.serving
                    self.serving_changed.set()
                else:
                    self.last_outputs_at = time.monotonic()
                    self._dispatch(message.outputs)
        except grpc.aio.AioRpcError as e:
            if not self._closing:
                log.error("the engine core's stream broke: %s", e.details())
        finally:
            self.connected = False
            self.closed.set()
            lost = frontend_pb2.Finished(
                finish_reason="abort",
                error=frontend_pb2.Error(
                    code=grpc.StatusCode.UNAVAILABLE.value[0], message=CORE_GONE
                ),
            )
            for registered in self._requests.values():
                registered.outputs.put_nowait(CoreOutputs(finished=[lost], core_gone=True))
            self._requests.clear()

    def _dispatch(self, outputs: frontend_pb2.StepOutputs) -> None:
        """Splits one core message by request, each request's share put on its queue at once."""
        split: dict[str, CoreOutputs] = {}
        logprobs = outputs.logprobs
        for i, (request_id, index, token) in enumerate(
            zip(outputs.request_ids, outputs.indices, outputs.token_ids, strict=True)
        ):
            mine = split.get(request_id)
            if mine is None:
                mine = split[request_id] = CoreOutputs()
            lp = logprobs[i] if logprobs and logprobs[i].entries else None
            mine.tokens.append((index, token, lp))
        for finished in outputs.finished:
            mine = split.get(finished.request_id)
            if mine is None:
                mine = split[finished.request_id] = CoreOutputs()
            mine.finished.append(finished)
        for request_id, mine in split.items():
            registered = self._requests.get(request_id)
            if registered is None:
                continue
            registered.outputs.put_nowait(mine)
            for finished in mine.finished:
                registered.unfinished -= 1
                if finished.HasField("error") or registered.unfinished == 0:
                    del self._requests[request_id]
                    break
