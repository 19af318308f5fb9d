"""A frontend's connection to the engine core: one Connect stream (protos/frontend.proto) and
the unary calls it forwards.

    add(AddRequest) -> the request's queue      ...      Connect stream      engine core
    abort(id), stop(id, index, stop_str)  --> batched into one FrontendMessage per loop turn -->
    request queues <-- every core message that came since the loop's last turn, split by
                       request (one CoreOutputs per request for all of them) <-- one per step

The stream is read by a thread of its own (grpc's blocking API), not on the event loop: the
loop takes, in one turn, every core message that came while it was busy. On the loop a read
of the stream takes a turn for itself, so a loop whose turns grow longer than a step (a frontend
holding many streams) fell further behind the core at every step, however many tokens each
client message carried; taken together, a request's tokens of all those steps leave in one
message, and a busy frontend's backlog is at most one turn.

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
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc

from protos import frontend_pb2, frontend_pb2_grpc, serving_pb2
from protos.cluster_secret import secret_metadata
from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.core.engine_core import PID_METADATA, PORT_METADATA
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
    """One request's share of the core messages that came since its last: (index, token,
    logprobs) per new token (logprobs None where not asked), then the completions that ended.
    core_gone: the core's stream broke (finished holds the request's end, UNAVAILABLE)."""

    tokens: list[tuple[int, int, serving_pb2.TokenLogprobs | None]] = field(default_factory=list)
    finished: list[frontend_pb2.Finished] = field(default_factory=list)
    core_gone: bool = False


@dataclass
class _Registered:
    outputs: asyncio.Queue  # of CoreOutputs
    unfinished: int  # completions the core has not ended
    # With wake_at_end: the outputs held back until a completion ends (None: none held).
    held: CoreOutputs | None = None
    wake_at_end: bool = False


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
        self._flush_pending = False  # a _flush is scheduled on the loop
        # FrontendMessages for the stream's sending side (grpc's thread); None ends it.
        self._sending: queue.SimpleQueue = queue.SimpleQueue()
        # The core's messages the reader thread took and the loop has not: (time, message).
        self._inbox: list[tuple[float, frontend_pb2.CoreMessage]] = []
        self._inbox_lock = threading.Lock()
        self._delivery_pending = False  # under _inbox_lock: a _deliver is scheduled
        self._closing = False

    async def start(self, frontend_port: int = 0) -> None:
        """Opens the stream, naming this frontend: its pid and its own Serving port."""
        self._loop = asyncio.get_running_loop()
        self._channel = grpc.aio.insecure_channel(self.address)  # the unary calls
        self._stub = frontend_pb2_grpc.EngineCoreStub(self._channel)
        self._stream_channel = grpc.insecure_channel(self.address)
        self._call = frontend_pb2_grpc.EngineCoreStub(self._stream_channel).Connect(
            iter(self._sending.get, None),
            metadata=(
                (PID_METADATA, str(os.getpid())),
                (PORT_METADATA, str(frontend_port)),
                *self._secret_metadata,
            ),
            wait_for_ready=True,
        )
        self.connected = True
        self._reader = threading.Thread(
            target=self._read, name=f"core-link-{self.address}", daemon=True
        )
        self._reader.start()
        self._beater = self._loop.create_task(self._beat())

    @property
    def num_requests(self) -> int:
        """Requests sent to the core that it has not ended yet (nor refused)."""
        return len(self._requests)

    def holds(self, request_id: str) -> bool:
        """Whether the request is sent to this core and not yet ended by it."""
        return request_id in self._requests

    def add(self, msg: frontend_pb2.AddRequest, wake_at_end: bool = False) -> asyncio.Queue:
        """Sends a request to the core; returns the queue its CoreOutputs arrive on. With
        wake_at_end, outputs are held back until one of its completions ends (or the core goes):
        then all of them come as one CoreOutputs, for a request that shows nothing before its
        end (one message, no stop strings), whose reader need not wake at every step."""
        if not self.connected:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, CORE_GONE)
        if msg.request_id in self._requests:
            raise ServingError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {msg.request_id!r} is already in use"
            )
        n = msg.params.n if msg.params.HasField("n") else 1
        registered = _Registered(asyncio.Queue(), n, wake_at_end=wake_at_end)
        self._requests[msg.request_id] = registered
        self._outgoing.add.append(msg)
        self._flush_soon()
        return registered.outputs

    def abort(self, request_id: str) -> None:
        """Asks the core to end every completion of a request (their ends still arrive)."""
        self._outgoing.abort.append(request_id)
        self._flush_soon()

    def stop(self, request_id: str, index: int, stop_str: str) -> None:
        """Tells the core that a completion's text reached a stop string."""
        self._outgoing.stop.add(request_id=request_id, index=index, stop_str=stop_str)
        self._flush_soon()

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
        """Ends the stream (the core aborts what this frontend still holds) and the channels."""
        self._closing = True
        self._beater.cancel()
        if self.connected:
            self._call.cancel()
            try:
                await asyncio.wait_for(self.closed.wait(), timeout=10)
            except TimeoutError:
                log.error("the engine core's stream did not end within 10 s of its cancel")
        self._sending.put(None)
        await self._channel.close()
        self._stream_channel.close()

    def _flush_soon(self) -> None:
        """What is queued leaves as one message once the loop's current turn has run."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Sends what was queued (an empty message when only the heartbeat calls)."""
        self._flush_pending = False
        if self._closing:
            return
        message, self._outgoing = self._outgoing, frontend_pb2.FrontendMessage()
        self._sending.put(message)

    async def _beat(self) -> None:
        """The stream speaks at least every heartbeat.interval_s, busy or idle."""
        while not self._closing:
            await asyncio.sleep(self._heartbeat.interval_s)
            self._flush()

    def _read(self) -> None:
        """The reader thread: hands the loop each core message as it comes; once the stream
        ends, its end."""
        error: grpc.RpcError | None = None
        try:
            for message in self._call:
                with self._inbox_lock:
                    self._inbox.append((time.monotonic(), message))
                    wake, self._delivery_pending = not self._delivery_pending, True
                if wake:
                    self._to_loop(self._deliver)
        except grpc.RpcError as e:
            error = e
        finally:
            self._to_loop(self._ended, error)

    def _to_loop(self, callback: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is left to tell
            pass

    def _deliver(self) -> None:
        """Applies, in order, every core message that came since the last call."""
        with self._inbox_lock:
            messages, self._inbox = self._inbox, []
            self._delivery_pending = False
        steps: list[frontend_pb2.StepOutputs] = []  # outputs not dispatched yet, in order
        for came, message in messages:
            if message.HasField("outputs"):
                self.last_outputs_at = came
                steps.append(message.outputs)
                continue
            self._dispatch(steps)
            steps = []
            if message.HasField("ready"):
                self._on_ready(message.ready)
            else:
                self.serving = message.serving
                self.serving_changed.set()
        self._dispatch(steps)

    def _ended(self, error: grpc.RpcError | None) -> None:
        """The stream ended (after every message it brought was delivered): the requests the
        core still held end UNAVAILABLE."""
        if error is not None and not self._closing:
            log.error("the engine core's stream broke: %s", error.details())
        self.connected = False
        self._sending.put(None)  # grpc's sending thread stops waiting
        self.closed.set()
        lost = frontend_pb2.Finished(
            finish_reason="abort",
            error=frontend_pb2.Error(code=grpc.StatusCode.UNAVAILABLE.value[0], message=CORE_GONE),
        )
        for registered in self._requests.values():
            held = registered.held.tokens if registered.held is not None else []
            registered.outputs.put_nowait(CoreOutputs(held, finished=[lost], core_gone=True))
        self._requests.clear()

    def _dispatch(self, steps: list[frontend_pb2.StepOutputs]) -> None:
        """Splits core messages by request: each request's share of all of them goes on its
        queue as one CoreOutputs (a completion's tokens come before its end, in every message
        and so in their sum)."""
        split: dict[str, CoreOutputs] = {}
        for outputs in steps:
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
            if registered.held is not None:  # what came before, then this
                registered.held.tokens += mine.tokens
                registered.held.finished += mine.finished
                mine, registered.held = registered.held, None
            if registered.wake_at_end and not mine.finished:
                registered.held = mine
                continue
            registered.outputs.put_nowait(mine)
            for finished in mine.finished:
                registered.unfinished -= 1
                if finished.HasField("error") or registered.unfinished == 0:
                    del self._requests[request_id]
                    break
