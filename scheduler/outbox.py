"""Deltas from the engine threads to the gRPC event loop, a burst at a time.

    engine thread:  post(q1, d1) post(q2, d2) ... post(q256, d256)     (one step's deltas)
                         |  the first post of a burst schedules one flush
    event loop:     flush(): q1.put_nowait(d1) ... q256.put_nowait(d256)

A step of 256 decodes is 256 deltas; waking the loop once per delta (a write to its self-pipe
each) would cost more than the step. Invariant: a flush is scheduled whenever `_pending` is not
empty, and deltas reach each queue in the order they were posted.
"""

import asyncio
import threading

from scheduler.engine import Delta, Sink


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Delta]] = []

    def sink(self, queue: asyncio.Queue) -> Sink:
        """A sink (called on any thread) that delivers into queue (read on the loop)."""
        return lambda delta: self._post(queue, delta)

    def _post(self, queue: asyncio.Queue, delta: Delta) -> None:
        with self._lock:
            self._pending.append((queue, delta))
            first = len(self._pending) == 1
        if first:
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, delta in pending:
            queue.put_nowait(delta)
