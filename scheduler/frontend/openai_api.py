"""The OpenAI-compatible HTTP API of a frontend, as a FastAPI app over a Backend.

    POST /v1/completions, /v1/chat/completions   (SSE when "stream": true)
    GET  /v1/models                              the served model
    GET  /health                                 200 when Backend.ready(), else 503
    GET  /metrics                                Prometheus (scheduler.frontend.metrics)

With ServerConfig tokens, every route but /health and /metrics needs the header
"Authorization: Bearer <token>". Errors are OpenAI's JSON, {"error": {"message", "type",
"param", "code"}}: 400 for a bad field (named in message and param), 401, 404 (an unknown model
is code model_not_found), 429 and 503 (a ServingError's gRPC code picks the status). A streamed
request is answered 200 only once its first message has come, so its errors keep their status;
a failure after that is sent as a last `data: {"error": ...}` event before `data: [DONE]`. A
client that goes away, streamed or not, closes its Backend.generate stream (the core aborts the
request). A batch of prompts is one GenerateRequest each, served at once; its choices are
numbered prompt by prompt, and the first failing prompt fails the body (closing the others).
For a streamed request Starlette cancels the task iterating it, with anyio's cancellation,
which is raised again at every await: a Backend's cleanup must not await, or shield what it
awaits. A body longer than server.max_request_bytes is 413 (411 when it declares no length).
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from protos import serving_pb2
from scheduler.auth import TokenAuthInterceptor
from scheduler.config import ServerConfig
from scheduler.frontend.backend import Backend, ServingError
from scheduler.frontend.metrics import CONTENT_TYPE, Metrics
from scheduler.frontend.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    InvalidField,
    ResponseBuilder,
    to_generate_requests,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_SERVER_INFO_TIMEOUT_S = 5.0  # a scrape waits this long for the core's state (Prometheus: 10)
_STATUS_OF_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An answer other than 200, as OpenAI's error JSON."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def of(cls, error: ServingError) -> "ApiError":
        return cls(_STATUS_OF_CODE.get(error.code, 500), error.message)

    def json(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": _ERROR_TYPES.get(
                    self.status, "invalid_request_error" if self.status < 500 else "server_error"
                ),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        """The error as JSON, ASCII-escaped: a message quoting a client's string renders even
        when that string is not valid Unicode."""
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return Response(
            json.dumps(self.json()),
            status_code=self.status,
            headers=headers,
            media_type="application/json",
        )


def _validation_error(error: RequestValidationError) -> ApiError:
    """Pydantic's first complaint as a 400 naming the field (FastAPI would answer 422)."""
    first = error.errors()[0]
    path = [str(part) for part in first["loc"][1:]]  # loc[0] is "body"
    if first["type"] == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first['msg']}")
    if not path:
        return ApiError(400, "the body must be a JSON object")
    param = ".".join(path)
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"{param}: not supported by this server", param)
    if first["type"] == "value_error":
        reason = str(first["ctx"]["error"])
    else:
        reason = first["msg"]
    return ApiError(400, f"{param}: {reason}", param)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (its body was read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """work's result, or None (work cancelled) if the client goes away first."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((work_task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work_task
    return work_task.result() if not work_task.cancelled() else None


def _event(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


class _BodyLimit:
    """ASGI middleware: a request body must declare its length (411 otherwise) and be at most
    max_bytes long (413 otherwise; server.max_request_bytes, as the gRPC side's). Uvicorn
    holds a body to its declared length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = Headers(scope=scope).get("content-length")
            if length is None:
                error = ApiError(411, "a request body needs a content-length header")
            elif int(length) > self.max_bytes:
                error = ApiError(
                    413,
                    f"the body is {length} bytes; server.max_request_bytes={self.max_bytes}",
                )
            else:
                error = None
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def make_app(backend: Backend, server_config: ServerConfig, metrics: Metrics) -> FastAPI:
    """The HTTP API of one frontend, over its backend. Streams go through metrics.track."""
    app = FastAPI(title="pagedserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, max_bytes=server_config.max_request_bytes)
    created = int(time.time())
    tokens = server_config.tokens()
    auth = TokenAuthInterceptor(tokens, frozenset(server_config.admin_tokens)) if tokens else None

    async def authorized(request: Request) -> None:
        if auth is None:
            return
        # The gRPC interceptor's check: a constant-time compare with every token.
        problem = auth._check(request.headers.get("authorization"))
        if problem is not None:
            raise ApiError(401, problem, code="invalid_api_key")

    def check_model(model: str) -> None:
        if model != backend.model_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist; this server serves `{backend.model_name}`.",
                param="model",
                code="model_not_found",
            )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> Response:
        return error.response()

    @app.exception_handler(ServingError)
    async def _serving_error(request: Request, error: ServingError) -> Response:
        return ApiError.of(error).response()

    @app.exception_handler(InvalidField)
    async def _invalid_field(request: Request, error: InvalidField) -> Response:
        return ApiError(400, error.message, error.param).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, error: RequestValidationError) -> Response:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        return ApiError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def _failure(request: Request, error: Exception) -> Response:
        # Starlette logs the exception (with its traceback) after this answer.
        return ApiError(500, f"the server failed: {type(error).__name__}").response()

    @app.get("/health")
    async def health() -> Response:
        if not backend.ready():
            raise ApiError(503, "the model is still loading; retry shortly")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        try:
            info = await asyncio.wait_for(backend.server_info(), _SERVER_INFO_TIMEOUT_S)
        except (ServingError, TimeoutError) as e:  # the core's state is left out, not the rest
            log.info("metrics: no server info (%s)", getattr(e, "message", "timed out"))
            info = None
        return Response(metrics.render(info), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        info = await backend.model_info()
        card = {
            "id": backend.model_name,
            "object": "model",
            "created": created,
            "owned_by": "pagedserve",
            "max_model_len": info.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await generate(body, f"cmpl-{uuid.uuid4().hex}", request)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        return await generate(body, f"chatcmpl-{uuid.uuid4().hex}", request)

    async def generate(
        body: CompletionRequest | ChatCompletionRequest, request_id: str, request: Request
    ) -> Response:
        messages = to_generate_requests(body, request_id)
        chat = isinstance(body, ChatCompletionRequest)
        builder = ResponseBuilder(request_id, body.model, chat, body.n or 1, body.top_logprobs_k())
        owner = auth.owner(request.headers.get("authorization")) if auth is not None else ""
        # A max_tokens past the context is a 400, as vLLM's OpenAI server has it.
        generates = [backend.generate(m, owner, refuse_past_context=True) for m in messages]
        stream = merged([metrics.track(m, g) for m, g in zip(messages, generates, strict=True)])
        if not body.stream:
            response = await _unless_disconnected(request, collect(stream, builder))
            return JSONResponse(response) if response is not None else Response()
        try:
            first = await _unless_disconnected(request, anext(stream))
        except StopAsyncIteration:
            raise ApiError(500, "the request's stream ended without a message") from None
        except BaseException:
            await stream.aclose()
            raise
        if first is None:
            await stream.aclose()
            return Response()
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        events = sse(first, stream, builder, include_usage)

        async def close_stream() -> None:  # an async def: Starlette awaits it on the loop
            await stream.aclose()

        # The background task closes stream also when the response ends before iterating events
        # (given stream.aclose itself, a built-in method, Starlette would call it in a thread
        # and drop the awaitable it returns).
        return StreamingResponse(
            events, media_type="text/event-stream", background=BackgroundTask(close_stream)
        )

    return app


Prompted = tuple[int, serving_pb2.GenerateResponse]  # a message, and its prompt's position


async def merged(
    streams: list[AsyncIterator[serving_pb2.GenerateResponse]],
) -> AsyncIterator[Prompted]:
    """The messages of a body's streams (one per prompt) as they come, each with its stream's
    position. The first error of any stream is raised; closing this closes every stream (those
    of a batch, iterated by a task each, by cancelling their tasks)."""
    if len(streams) == 1:  # the common case: no task, no queue
        async with contextlib.aclosing(streams[0]) as stream:
            async for msg in stream:
                yield 0, msg
        return
    queue: asyncio.Queue[Prompted | asyncio.Task] = asyncio.Queue()

    async def pump(prompt: int, stream: AsyncIterator[serving_pb2.GenerateResponse]) -> None:
        async with contextlib.aclosing(stream):
            async for msg in stream:
                queue.put_nowait((prompt, msg))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    for task in tasks:
        task.add_done_callback(queue.put_nowait)
    try:
        for _ in tasks:  # until every task is done
            while not isinstance(item := await queue.get(), asyncio.Task):
                yield item
            item.result()  # a stream's error
    finally:
        for task in tasks:
            task.cancel()


async def collect(stream: AsyncIterator[Prompted], builder: ResponseBuilder) -> dict:
    """An unstreamed body's response, once its stream has ended."""
    async with contextlib.aclosing(stream):
        async for prompt, msg in stream:
            builder.add(msg, prompt)
    return builder.response()


async def sse(
    first: Prompted,
    stream: AsyncIterator[Prompted],
    builder: ResponseBuilder,
    include_usage: bool,
) -> AsyncIterator[str]:
    """A streamed body's server-sent events, from its first message on. If the client goes
    away, Starlette cancels this generator's task: stream is closed on the way out."""
    async with contextlib.aclosing(stream):
        try:
            if (chunk := builder.chunk(first[1], first[0])) is not None:
                yield _event(chunk)
            async for prompt, msg in stream:
                if (chunk := builder.chunk(msg, prompt)) is not None:
                    yield _event(chunk)
            if include_usage:
                yield _event(builder.usage_chunk())
        except ServingError as e:
            yield _event(ApiError.of(e).json())
        yield _event("[DONE]")
