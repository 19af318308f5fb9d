"""gRPC keepalive between the engine core and its workers (worker.proto's channels).

The core pings each worker's channel every `time_s` and drops the connection when no answer
comes within `timeout_s`: the worker's Execute stream then ends UNAVAILABLE, and the engine,
which watches each stream's end, fails the replica. This finds what a stream's end alone never
shows: a worker process that is alive but stopped (SIGSTOP, a frozen VM: the kernel keeps its
socket open, but nobody answers an HTTP/2 PING), and a peer gone without a FIN or RST (its host
down, a half-open TCP connection). A worker stuck inside a step (a hung kernel, a deadlocked
collective) still answers pings: the engine's step watchdog finds that (scheduler.step_timeout_s).

Both ends must agree: a gRPC server by default answers pings more frequent than every five
minutes with a GOAWAY, so the workers' servers take SERVER_OPTIONS.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Keepalive:
    """How often the core pings a worker (time_s) and how long it waits for the answer."""

    time_s: float = 5.0
    timeout_s: float = 5.0

    def channel_options(self) -> list[tuple[str, int]]:
        """The client channel's options: ping every time_s, busy or idle."""
        return [
            ("grpc.keepalive_time_ms", int(self.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.timeout_s * 1000)),
            # grpcio 1.85 times every ping out after this (default a minute), keepalive pings
            # included, whatever keepalive_timeout_ms says (seen in its http2_ping trace).
            ("grpc.http2.ping_timeout_ms", int(self.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # An idle engine's Execute streams carry no data for as long as no request comes:
            # pings go on regardless (gRPC's default stops after two).
            ("grpc.http2.max_pings_without_data", 0),
        ]


# A worker's server accepts the core's pings however often they come (no strikes, no GOAWAY).
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 0),
    ("grpc.http2.max_ping_strikes", 0),
]
