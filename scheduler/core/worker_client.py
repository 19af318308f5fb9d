"""The engine core's connection to one worker rank: one gRPC channel, made here and closed here,
carrying every call to that rank (bring-up RPCs and the Execute stream).

    WorkerClient(address) --one channel--> Worker service of one rank
        .call(method, request)   a unary RPC as a future (bring-up: every rank at once)
        .execute()               the long-lived Execute stream (WorkerStream)
        .close()                 the channel and with it any stream on it

The channel pings its rank (protos/keepalive.py): a rank whose process is stopped or whose
connection went half-open ends its Execute stream UNAVAILABLE within seconds.
"""

import queue
from collections.abc import Callable, Iterator, Sequence

import grpc

from protos import worker_pb2, worker_pb2_grpc
from protos.cluster_secret import secret_metadata
from protos.keepalive import Keepalive

WORKER_RPC_TIMEOUT_S = 600.0  # a bring-up RPC (loading a model, capturing graphs) may take long
_MAX_MESSAGE_BYTES = 256 << 20  # a plan of new requests with long prompts
KEEPALIVE = Keepalive()  # a stopped or vanished rank is found within 10 s


class StreamEnded(RuntimeError):
    """A rank's Execute stream ended: it failed, went away, or the call was cancelled."""


class WorkerStream:
    """The Execute stream to one rank: send() a plan, recv() its result, in order."""

    def __init__(
        self, address: str, stub: worker_pb2_grpc.WorkerStub, metadata: tuple = ()
    ) -> None:
        self.address = address
        self._plans: queue.SimpleQueue = queue.SimpleQueue()
        self._results = stub.Execute(self._iter_plans(), metadata=metadata)

    def _iter_plans(self) -> Iterator[worker_pb2.StepPlan]:
        while (plan := self._plans.get()) is not None:
            yield plan

    def send(self, plan: worker_pb2.StepPlan) -> None:
        self._plans.put(plan)

    def recv(self) -> worker_pb2.StepResult:
        """The rank's next result; StreamEnded once the stream has ended."""
        try:
            return next(self._results)
        except grpc.RpcError as e:
            why = f"worker {self.address} failed: {e.code().name}: {e.details()}"
            # gRPC raises the call itself, which this stream holds: as it went up through the
            # engine's frames, its traceback would hold them, and they the engine, a cycle that
            # kept a failed replica's engine (its page table: megabytes) until a full cyclic
            # collection. The call's own traceback goes; a new exception goes up instead.
            e.__traceback__ = None
        raise StreamEnded(why)

    def on_end(self, callback: Callable[["WorkerStream", str], None]) -> None:
        """Calls callback(stream, why) once the stream has ended, however it ends: the rank
        answered its last result, failed, or went away (why: the call's status and details).
        It runs on a gRPC thread, at once if the stream has ended already."""

        def ended(call: grpc.Future) -> None:
            callback(self, f"{call.code().name}: {call.details()}")

        self._results.add_done_callback(ended)

    def close(self) -> None:
        """Ends the stream (the rank drops it); the channel stays open."""
        self._plans.put(None)

    def cancel(self) -> None:
        """Cancels the call at once: a recv() waiting on it raises (CANCELLED), whatever the
        rank does (a hung rank never answers, so close() would never end the stream)."""
        self._results.cancel()


class WorkerClient:
    def __init__(
        self, address: str, secret: str | None = None, keepalive: Keepalive = KEEPALIVE
    ) -> None:
        """secret: the cluster secret, sent with every call (protos/cluster_secret.py).
        keepalive: how the channel pings the rank."""
        self.address = address
        self._metadata = secret_metadata(secret)
        self._channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
                *keepalive.channel_options(),
            ],
        )
        self._stub = worker_pb2_grpc.WorkerStub(self._channel)

    def call(self, method: str, request, timeout: float = WORKER_RPC_TIMEOUT_S) -> grpc.Future:
        """Starts the unary RPC `method` (InitCache, LoadModel, ...); returns its future."""
        return getattr(self._stub, method).future(request, timeout=timeout, metadata=self._metadata)

    def wait_until_up(self, timeout: float) -> worker_pb2.HealthResponse:
        """Health, waiting for the rank's server to listen."""
        return self._stub.Health(
            worker_pb2.Empty(), timeout=timeout, wait_for_ready=True, metadata=self._metadata
        )

    def execute(self) -> WorkerStream:
        """Opens the rank's Execute stream on this channel."""
        return WorkerStream(self.address, self._stub, self._metadata)

    def close(self) -> None:
        self._channel.close()


def call_all(workers: Sequence[WorkerClient], method: str, requests) -> list:
    """The RPC on every rank at once (collectives inside it need all ranks), then every answer
    in rank order. requests: one message for all ranks, or a list of one per rank."""
    if not isinstance(requests, list):
        requests = [requests] * len(workers)
    calls = [w.call(method, r) for w, r in zip(workers, requests, strict=True)]
    return [call.result() for call in calls]
