"""The frontend's heartbeat on its Connect stream to the engine core (frontend.proto).

A frontend that has sent nothing for `interval_s` sends an empty FrontendMessage; every message
it sends counts. The core takes a frontend whose stream has carried nothing for `timeout_s` for
hung: it aborts the frontend's requests, frees their blocks and ends the stream, as for a
frontend that died.

Why a message and not gRPC keepalive (protos/keepalive.py, which the core's worker channels
use): an HTTP/2 PING is answered by gRPC's own threads, so a frontend whose event loop is
blocked (a handler stuck in a call, a loop starved) answers pings for as long as it is blocked;
measured with grpcio 1.85 (pings every 1 s, 1 s to answer): the stream of a client whose loop
blocked for 12 s lived until the client was killed, while a stopped client (SIGSTOP) was cut
2.4 s after the stop. A message is sent by the frontend's event loop itself, so its absence
shows both: a stopped process and a loop that no longer turns.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Heartbeat:
    """How often an idle frontend speaks (interval_s) and how long the core waits for it."""

    interval_s: float = 1.0
    timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.interval_s < self.timeout_s:
            raise ValueError(
                f"a heartbeat needs 0 < interval_s < timeout_s, got interval_s={self.interval_s}"
                f", timeout_s={self.timeout_s}"
            )


HEARTBEAT = Heartbeat()
