"""One frontend's Connect stream as the engine core holds it: the sink of that frontend's
requests (OutputSink) and the queue of messages the stream sends it.

    engine threads --send(StepOutputs)--> queue --next()--> Connect's response stream
    close() (the stream broke, or the core stops) ends next() after what is queued.
"""

import queue
import threading

from protos import frontend_pb2, serving_pb2


class FrontendLink:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.num_requests = 0  # requests it added (the stream's reader thread counts)
        self._queue: queue.SimpleQueue[frontend_pb2.CoreMessage | None] = queue.SimpleQueue()
        self._closed = threading.Event()

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

    @property
    def closed(self) -> bool:
        return self._closed.is_set()
