"""What a frontend's client-facing services (Serving gRPC, OpenAI HTTP) call: one interface, so
a request is validated, tokenized and streamed by one piece of code whichever wire it came on.

    gRPC Serving service --+
                           +--> Backend.generate(GenerateRequest) --> GenerateResponse stream
    OpenAI HTTP app -------+        (validate, tokenize, core, detokenize, stop strings)

The HTTP app converts an OpenAI body into a serving_pb2.GenerateRequest once, at its boundary,
and converts the responses back; the gRPC service passes them through.
"""

from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from protos import serving_pb2


class ServingError(Exception):
    """A request refused or failed, as the client is told: a gRPC status and a sentence naming
    the field or the reason. The HTTP side maps the code to its status (INVALID_ARGUMENT 400,
    UNAUTHENTICATED 401, NOT_FOUND 404, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Backend(Protocol):
    """A frontend as its client-facing services see it. Every method may raise ServingError."""

    model_name: str

    def ready(self) -> bool:
        """Whether the model is loaded and requests are taken (health answers SERVING)."""
        ...

    def generate(
        self,
        request: serving_pb2.GenerateRequest,
        owner: str = "",
        refuse_past_context: bool = False,
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        """Streams one request's completions: messages as the Serving API's Generate sends them
        (per completion `index`, the last one with finish_reason and usage). Closing the
        iterator early (the client went away) aborts the request in the core. owner: who
        submits it (TokenAuthInterceptor.owner), the only caller its abort() finds it for.
        refuse_past_context: a max_tokens past the context is refused INVALID_ARGUMENT (the
        OpenAI API's way) rather than run to max_model_len (InputProcessor.process)."""
        ...

    async def abort(self, request_id: str, owner: str = "") -> bool:
        """Stops a request of owner ("" = any: no tokens, or an admin); whether it was found."""
        ...

    async def model_info(self) -> serving_pb2.ModelInfoResponse: ...

    async def server_info(self) -> serving_pb2.ServerInfoResponse:
        """Replicas, queues, KV usage and counters, as GetServerInfo answers."""
        ...

    async def scale(self, replicas: int) -> serving_pb2.ScaleResponse:
        """Sets how many replicas serve, as Scale answers."""
        ...
