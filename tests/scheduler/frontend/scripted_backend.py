"""A Backend test double: it streams GenerateResponses a test scripts for each request, records
the GenerateRequests it gets (so a test checks the conversion it was given) and tells when a
stream is closed. It stands in for the engine core in tests of the HTTP layer and the metrics."""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import grpc

from protos import serving_pb2
from scheduler.frontend.backend import ServingError

MODEL = "test-model"
HOLD = object()  # in a script: wait there until the stream is closed


def delta(index: int, token_ids: list[int], text: str, **fields) -> serving_pb2.GenerateResponse:
    """A message that extends completion index."""
    return serving_pb2.GenerateResponse(index=index, token_ids=token_ids, text=text, **fields)


def last(
    index: int,
    token_ids: list[int],
    text: str,
    finish_reason: str = "stop",
    prompt_tokens: int = 4,
    completion_tokens: int = 1,
    queue_ms: float = 0.0,
    ttft_ms: float = 0.0,
    total_ms: float = 0.0,
    **fields,
) -> serving_pb2.GenerateResponse:
    """The last message of completion index, with its usage and timings."""
    return serving_pb2.GenerateResponse(
        index=index,
        token_ids=token_ids,
        text=text,
        finish_reason=finish_reason,
        usage=serving_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens),
        timings=serving_pb2.Timings(
            queue_ms=queue_ms, time_to_first_token_ms=ttft_ms, total_ms=total_ms
        ),
        **fields,
    )


Script = Callable[[serving_pb2.GenerateRequest], list]


class ScriptedBackend:
    """Answers generate(request) with script(request): GenerateResponses sent in order, a
    ServingError raised where it stands, HOLD waits for the stream to be closed."""

    model_name = MODEL

    def __init__(
        self,
        script: Script = lambda request: [last(0, [7], "hi")],
        ready: bool = True,
        server_info: serving_pb2.ServerInfoResponse | None = None,
    ) -> None:
        self.script = script
        self._ready = ready
        self._server_info = server_info
        self.requests: list[serving_pb2.GenerateRequest] = []
        self.holding = threading.Event()  # a stream waits at HOLD
        self.closed = threading.Event()  # a stream has ended, finished or closed
        self._closes = threading.Semaphore(0)  # released as each stream ends
        self.owners: list[str] = []  # generate()'s owner of each of requests
        self.refusing: list[bool] = []  # generate()'s refuse_past_context of each

    def ready(self) -> bool:
        return self._ready

    async def generate(
        self,
        request: serving_pb2.GenerateRequest,
        owner: str = "",
        refuse_past_context: bool = False,
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        self.requests.append(request)
        self.owners.append(owner)
        self.refusing.append(refuse_past_context)
        try:
            for item in self.script(request):
                if item is HOLD:
                    self.holding.set()
                    await asyncio.Event().wait()  # never set: only closing the stream ends it
                elif isinstance(item, ServingError):
                    raise item
                else:
                    yield item
        finally:
            self.closed.set()
            self._closes.release()

    def wait_closed(self, num_streams: int, timeout: float) -> bool:
        """Whether num_streams streams end within timeout (each)."""
        return all(self._closes.acquire(timeout=timeout) for _ in range(num_streams))

    async def abort(self, request_id: str, owner: str = "") -> bool:
        return False

    async def model_info(self) -> serving_pb2.ModelInfoResponse:
        return serving_pb2.ModelInfoResponse(model=MODEL, max_model_len=2048)

    async def server_info(self) -> serving_pb2.ServerInfoResponse:
        if self._server_info is None:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, "no engine core in this test")
        return self._server_info
