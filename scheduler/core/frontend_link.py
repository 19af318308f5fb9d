"""One frontend's Connect stream as the engine core holds it: the sink of that frontend's
requests (OutputSink), the queue of messages the stream sends it, and when the frontend last
spoke (its heartbeat, protos/heartbeat.py).

    engine threads --send(StepOutputs)--> queue --next()--> Connect's response stream
    the stream's reader --heard()--> last_heard (every message, heartbeats included)
    close() (the stream broke, or the core stops) ends next() after what is queued;
    hang_up() (the frontend fell silent) also cancels the call.
"""

import queue
import threading
import time
from collections.abc import Callable

from protos import frontend_pb2, serving_pb2


class FrontendLink:
    def __init__(
        self, pid: int, cancel: Callable[[], None] = lambda: None, port: int = 0
    ) -> None:
        """cancel: ends the Connect call at once (its context's cancel), called by hang_up.
        port: the frontend's own Serving port (0: not told)."""
        self.pid = pid
        self.port = port
        self.num_requests = 0  # requests it added (the stream's reader thread counts)
        # time.monotonic() of the frontend's last message (or of the stream's start); written
        # by the reader thread alone, read without a lock (a float's read).
        self.last_heard = time.monotonic()
        self._cancel = cancel
        self._queue: queue.SimpleQueue[frontend_pb2.CoreMessage | None] = queue.SimpleQueue()
        self._closed = threading.Event()

    def heard(self) -> None:
        """The frontend sent a message: it is alive."""
        self.last_heard = time.monotonic()

    def silent_for(self) -> float:
        """Seconds since the frontend's last message."""
        return time.monotonic() - self.last_heard

    def send(self, outputs: frontend_pb2.StepOutputs) -> None:
        """Queues one message of outputs; never blocks (engines call it under their lock)."""
        if not self._closed.is_set():
            self._queue.put(frontend_pb2.CoreMessage(outputs=outputs))

    def send_ready(self, model_info: serving_pb2.ModelInfoResponse) -> None:
        self._queue.put(frontend_pb2.CoreMessage(ready=model_info))

    def send_serving(self, serving: bool) -> None:
        """Whether some replica serves, now (the frontend's health follows it)."""
        self._queue.put(frontend_pb2.CoreMessage(serving=serving))

    def next(self) -> frontend_pb2.CoreMessage | None:
        """The next message for the stream; None once the link is closed."""
        return self._queue.get()

    def close(self) -> None:
        """Ends the link (idempotent): next() answers None after what is queued."""
        if not self._closed.is_set():
            self._closed.set()
            self._queue.put(None)

    def hang_up(self) -> None:
        """Closes the link and cancels its call: a silent frontend reads nothing more, and a
        response blocked on its full window is released."""
        self.close()
        self._cancel()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()
