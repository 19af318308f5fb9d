"""gRPC clients of the Serving service: Client (blocking) and AsyncClient (asyncio).

client = Client("127.0.0.1:50051")
for delta in client.generate("Hello", SamplingParams(max_tokens=32)):
    print(delta.text, end="")

A server's frontends share its port, and the kernel hands each connection to one of them: a
client of few connections loads them unevenly. spread() asks the server for every frontend's
own port, connects to each, and sends each later Generate to the next of them in turn (the
other calls concern every frontend alike and keep the shared port).
"""

import asyncio
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import serving_pb2, serving_pb2_grpc
from scheduler.sampling_params import SamplingParams

Prompt = str | list[int] | list[dict[str, str]]  # text, token ids, or chat messages

# gRPC retries a call that fails UNAVAILABLE (server restarting, connection refused) with
# backoff; a stream is retried only before its first message, so no delta is ever repeated.
_RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [
                {"service": "pagedserve.serving.Serving"},
                {"service": "grpc.health.v1.Health"},
            ],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.2s",
                "maxBackoff": "3s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}
CHANNEL_OPTIONS = [
    ("grpc.enable_retries", 1),
    ("grpc.service_config", json.dumps(_RETRY_POLICY)),
]


# A spread channel fails at once where its frontend is gone (no retries of its own): the call
# goes to the shared port then, whose channel retries.
_SPREAD_OPTIONS = [("grpc.enable_retries", 0)]
# Where each spread client of this process starts its turns: successive clients start at
# successive frontends, so that clients of one request each still spread.
_SPREAD_STARTS = itertools.count()
# A frontend that failed a call before answering sits out this long, then takes its turns again:
# one whose engine core was gone a moment serves again; one gone for good fails one call at once
# (its channel does not retry) and sits out again.
REJOIN_AFTER_S = 10.0
# A rerouted call whose request id the core still holds (the gone frontend's copy, not aborted
# yet) is sent again for this long, at growing intervals, before ALREADY_EXISTS reaches the caller.
REROUTE_WAIT_S = 5.0


class _Turns:
    """The frontends' stubs in turn (from the next start); one whose frontend failed a call
    before answering sits out REJOIN_AFTER_S (the shared port's stub stands in for all while
    fewer than two take turns)."""

    def __init__(self, shared: serving_pb2_grpc.ServingStub, channels: list = ()) -> None:
        self.shared = shared
        start = next(_SPREAD_STARTS) % len(channels) if channels else 0
        ordered = [*channels[start:], *channels[:start]]
        self._stubs = [serving_pb2_grpc.ServingStub(c) for c in ordered]
        self._out: dict[serving_pb2_grpc.ServingStub, float] = {}  # stub -> when it left
        self._next = 0
        self._lock = threading.Lock()

    def next(self) -> serving_pb2_grpc.ServingStub:
        with self._lock:
            now = time.monotonic()
            self._out = {s: t for s, t in self._out.items() if now - t < REJOIN_AFTER_S}
            taking = [s for s in self._stubs if s not in self._out]
            if len(taking) < 2:
                return self.shared
            stub = taking[self._next % len(taking)]
            self._next += 1
            return stub

    def drop(self, stub: serving_pb2_grpc.ServingStub) -> None:
        with self._lock:
            if stub in self._stubs:
                self._out[stub] = time.monotonic()


def _rerouted(error: grpc.RpcError, received: bool, stub, turns: _Turns) -> bool:
    """Whether a call that failed goes again to the shared port: a spread call whose frontend
    failed it UNAVAILABLE before answering anything (the frontend is gone; its stub sits out).
    The core aborts a gone frontend's requests, so the request runs once."""
    if received or stub is turns.shared or error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    turns.drop(stub)
    return True


def _resend_waits() -> Iterator[float]:
    """The waits before each resend of a rerouted call refused ALREADY_EXISTS (REROUTE_WAIT_S
    in all)."""
    wait, left = 0.05, REROUTE_WAIT_S
    while left > 0:
        yield min(wait, left)
        left -= wait
        wait = min(2 * wait, 0.5)


def _in_use(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.ALREADY_EXISTS


class _ReroutedStream:
    """Client.generate's stream of a spread call: its deltas, or, where _rerouted says so, the
    same request's from the shared port. cancel() cancels the call under way."""

    def __init__(self, call, stub, turns: _Turns, again) -> None:
        self._call, self._stub, self._turns, self._again = call, stub, turns, again
        self._received = False

    def __iter__(self) -> "_ReroutedStream":
        return self

    def __next__(self) -> serving_pb2.GenerateResponse:
        try:
            delta = next(self._call)
        except grpc.RpcError as e:
            if not _rerouted(e, self._received, self._stub, self._turns):
                raise
            delta = self._reroute()
        self._received = True
        return delta

    def _reroute(self) -> serving_pb2.GenerateResponse:
        """The first delta of the call sent again to the shared port (again while refused
        ALREADY_EXISTS, _resend_waits)."""
        self._stub = self._turns.shared
        for wait in _resend_waits():
            self._call = self._again()
            try:
                return next(self._call)
            except grpc.RpcError as e:
                if not _in_use(e):
                    raise
            time.sleep(wait)
        self._call = self._again()
        return next(self._call)

    def cancel(self) -> bool:
        return self._call.cancel()


def frontend_addresses(address: str, info: serving_pb2.ServerInfoResponse) -> list[str]:
    """host:port of every frontend's own port (FrontendInfo.port) on address's host; empty
    when the server names fewer than two."""
    ports = sorted({f.port for f in info.frontends if f.port})
    host = address.rsplit(":", 1)[0]
    return [f"{host}:{port}" for port in ports] if len(ports) > 1 else []


def make_request(
    prompt: Prompt, params: SamplingParams | None = None, request_id: str = "", priority: int = 0
) -> serving_pb2.GenerateRequest:
    """Text, token ids or chat messages ([{"role": ..., "content": ...}]) -> GenerateRequest."""
    params = params or SamplingParams()
    msg = serving_pb2.GenerateRequest(
        request_id=request_id, params=params.to_proto(), priority=priority
    )
    if isinstance(prompt, str):
        msg.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        msg.messages.messages.extend(
            serving_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in prompt
        )
    else:
        msg.prompt_token_ids.ids.extend(prompt)
        msg.prompt_token_ids.SetInParent()
    return msg


@dataclass(frozen=True)
class Credentials:
    """How a client proves itself and checks the server. token: sent as "authorization: Bearer
    <token>" on every call. tls_ca_file: PEM roots that sign the server's certificate (setting
    it turns TLS on); tls_cert_file and tls_key_file: this client's certificate, for mTLS."""

    token: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials, or None for a plaintext channel."""
        if self.tls_ca_file is None:
            if self.tls_cert_file or self.tls_key_file:
                raise ValueError("a client certificate needs tls_ca_file (TLS) as well")
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca_file),
            private_key=_read(self.tls_key_file),
            certificate_chain=_read(self.tls_cert_file),
        )


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


class Client:
    def __init__(self, address: str, credentials: Credentials | None = None) -> None:
        self.address = address
        credentials = credentials or Credentials()
        self._tls = credentials.channel_credentials()
        self._channel = self._open(address)
        self._metadata = credentials.metadata
        self._stub = serving_pb2_grpc.ServingStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._spread: list[grpc.Channel] = []  # the frontends' own, once spread()
        self._turns = _Turns(self._stub)

    def _open(self, target: str, options: list = CHANNEL_OPTIONS) -> grpc.Channel:
        if self._tls is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, self._tls, options=options)

    def spread(self, timeout: float = 5.0) -> int:
        """Sends later Generates to the server's frontends in turn (see the module doc), those
        whose own port connects within timeout seconds; returns how many (1: where fewer than
        two connect, every call keeps the shared port)."""
        addresses = frontend_addresses(self.address, self.server_info())
        channels = [self._open(a, _SPREAD_OPTIONS) for a in addresses]
        connecting = [grpc.channel_ready_future(c) for c in channels]  # all at once
        deadline, ready = time.monotonic() + timeout, []
        for channel, future in zip(channels, connecting, strict=True):
            try:
                future.result(max(deadline - time.monotonic(), 0.0))
                ready.append(channel)
            except grpc.FutureTimeoutError:
                future.cancel()
                channel.close()
        if len(ready) < 2:
            for channel in ready:
                channel.close()
            return 1
        for channel in self._spread:  # an earlier spread()'s
            channel.close()
        self._spread = ready
        self._turns = _Turns(self._stub, ready)
        return len(ready)

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
        priority: int = 0,
    ) -> Iterator[serving_pb2.GenerateResponse]:
        """Streams the deltas of the n completions (each names its index); a completion's last
        one carries its finish_reason and usage."""
        msg = make_request(prompt, params, request_id, priority)
        stub = self._turns.next()
        call = stub.Generate(msg, timeout=timeout, metadata=self._metadata)
        if stub is self._stub:
            return call

        def again() -> Iterator[serving_pb2.GenerateResponse]:
            return self._stub.Generate(msg, timeout=timeout, metadata=self._metadata)

        return _ReroutedStream(call, stub, self._turns, again)

    def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        return self._stub.Abort(
            serving_pb2.AbortRequest(request_id=request_id),
            timeout=timeout,
            metadata=self._metadata,
        ).found

    def model_info(self, timeout: float = 10.0) -> serving_pb2.ModelInfoResponse:
        return self._stub.GetModelInfo(
            serving_pb2.ModelInfoRequest(), timeout=timeout, metadata=self._metadata
        )

    def server_info(self, timeout: float = 10.0) -> serving_pb2.ServerInfoResponse:
        return self._stub.GetServerInfo(
            serving_pb2.ServerInfoRequest(), timeout=timeout, metadata=self._metadata
        )

    def scale(self, replicas: int, timeout: float = 1800.0) -> serving_pb2.ScaleResponse:
        """Asks for `replicas` serving replicas: new ones are placed and loaded before this
        returns; surplus ones drain (finish their requests) and then stop."""
        return self._stub.Scale(
            serving_pb2.ScaleRequest(replicas=replicas), timeout=timeout, metadata=self._metadata
        )

    def health(self, timeout: float = 10.0) -> str:
        """ "SERVING", "NOT_SERVING", ... for the Serving service."""
        reply = self._health.Check(
            health_pb2.HealthCheckRequest(service="pagedserve.serving.Serving"), timeout=timeout
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def close(self) -> None:
        for channel in (self._channel, *self._spread):
            channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient:
    """The asyncio twin of Client; create it inside the event loop that uses it."""

    def __init__(
        self, address: str, credentials: Credentials | None = None, own_connection: bool = False
    ) -> None:
        """own_connection: a TCP connection of its own. gRPC otherwise shares one connection
        among a process's channels to the same address, and a server's frontends share its
        port: each connection is served by the one frontend the kernel handed it to."""
        self.address = address
        credentials = credentials or Credentials()
        self._tls = credentials.channel_credentials()
        self._own = [("grpc.use_local_subchannel_pool", 1)] * own_connection
        self._channel = self._open(address)
        self._metadata = credentials.metadata
        self._stub = serving_pb2_grpc.ServingStub(self._channel)
        self._spread: list[grpc.aio.Channel] = []  # the frontends' own, once spread()
        self._turns = _Turns(self._stub)

    def _open(self, target: str, spread: bool = False) -> grpc.aio.Channel:
        options = [*(_SPREAD_OPTIONS if spread else CHANNEL_OPTIONS), *self._own]
        if self._tls is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, self._tls, options=options)

    async def spread(self, timeout: float = 5.0) -> int:
        """Client.spread's twin: later Generates to the frontends in turn, those whose own port
        connects within timeout seconds; returns how many (1: the shared port)."""
        info = await self.server_info()
        channels = [self._open(a, spread=True) for a in frontend_addresses(self.address, info)]

        async def connects(channel: grpc.aio.Channel) -> bool:
            try:
                await asyncio.wait_for(channel.channel_ready(), timeout)
                return True
            except TimeoutError:
                await channel.close()
                return False

        connected = await asyncio.gather(*map(connects, channels))
        ready = [c for c, ok in zip(channels, connected, strict=True) if ok]
        if len(ready) < 2:
            for channel in ready:
                await channel.close()
            return 1
        for channel in self._spread:  # an earlier spread()'s
            await channel.close()
        self._spread = ready
        self._turns = _Turns(self._stub, ready)
        return len(ready)

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str = "",
        timeout: float | None = None,
        priority: int = 0,
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        msg = make_request(prompt, params, request_id, priority)
        stub = self._turns.next()
        received = False
        try:
            async for delta in stub.Generate(msg, timeout=timeout, metadata=self._metadata):
                received = True
                yield delta
        except grpc.RpcError as e:
            if not _rerouted(e, received, stub, self._turns):
                raise
        else:
            return
        for wait in [*_resend_waits(), None]:  # sent again to the shared port
            try:
                async for delta in self._stub.Generate(
                    msg, timeout=timeout, metadata=self._metadata
                ):
                    received = True
                    yield delta
                return
            except grpc.RpcError as e:
                if received or not _in_use(e) or wait is None:
                    raise
            await asyncio.sleep(wait)

    async def abort(self, request_id: str, timeout: float = 10.0) -> bool:
        reply = await self._stub.Abort(
            serving_pb2.AbortRequest(request_id=request_id),
            timeout=timeout,
            metadata=self._metadata,
        )
        return reply.found

    async def model_info(self, timeout: float = 10.0) -> serving_pb2.ModelInfoResponse:
        return await self._stub.GetModelInfo(
            serving_pb2.ModelInfoRequest(), timeout=timeout, metadata=self._metadata
        )

    async def server_info(self, timeout: float = 10.0) -> serving_pb2.ServerInfoResponse:
        return await self._stub.GetServerInfo(
            serving_pb2.ServerInfoRequest(), timeout=timeout, metadata=self._metadata
        )

    async def wait_until_ready(self, timeout: float) -> None:
        """Connects now (a channel connects lazily, on its first call); raises TimeoutError."""
        await asyncio.wait_for(self._channel.channel_ready(), timeout)

    async def close(self) -> None:
        for channel in (self._channel, *self._spread):
            await channel.close()
