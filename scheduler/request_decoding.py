"""Requests that fail to decode are the client's fault: INVALID_ARGUMENT with a sentence, as
server interceptors (one for grpc.aio servers, one for thread-pool servers).

A generated handler decodes the request inside gRPC, which answers UNKNOWN when the bytes are
not a valid message (truncated, invalid UTF-8 in a string field, a wrong wire type). These
interceptors take the decoding over: gRPC hands the handler the raw bytes, the interceptor
decodes them with the method's own deserializer and refuses what does not parse before the
servicer runs. Stream requests are decoded message by message: a bad one ends the request
stream (the servicer sees it end) and the call ends INVALID_ARGUMENT.
"""

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError

from scheduler.grpc_handlers import handler_like

Decode = Callable[[bytes], Any]


def _request_type(method: str) -> str:
    """The full name of a method's request message ("/pkg.Service/Method"), for the sentence."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        found = descriptor_pool.Default().FindServiceByName(service).FindMethodByName(name)
    except KeyError:
        return "request message"
    return found.input_type.full_name


def _problem(method: str, error: DecodeError) -> str:
    return f"the request is not a valid {_request_type(method)}: {error}"


def _refuse_stream(context, method: str, error: DecodeError) -> None:
    """The status a call ends with once its request stream stops at a message that failed."""
    context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
    context.set_details(_problem(method, error))


class AsyncRequestDecoding(grpc.aio.ServerInterceptor):
    """For grpc.aio servers whose servicer methods are coroutines and async generators."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        decode = handler.request_deserializer if handler is not None else None
        if decode is None:
            return handler
        method = details.method

        async def request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            try:
                return decode(raw)
            except DecodeError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _problem(method, e))

        async def requests(raw: AsyncIterator[bytes], context) -> AsyncIterator[Any]:
            async for message in raw:
                try:
                    yield decode(message)
                except DecodeError as e:
                    _refuse_stream(context, method, e)
                    return

        async def unary_unary(raw, context):
            return await handler.unary_unary(await request(raw, context), context)

        async def stream_unary(raw, context):
            return await handler.stream_unary(requests(raw, context), context)

        # A streaming method is an async generator, or a coroutine that writes its responses
        # (context.write): the wrapper is the same kind, as gRPC tells them apart by it.
        streaming = handler.unary_stream or handler.stream_stream
        if inspect.iscoroutinefunction(streaming):

            async def unary_stream(raw, context):
                return await streaming(await request(raw, context), context)

            async def stream_stream(raw, context):
                return await streaming(requests(raw, context), context)

        else:

            async def unary_stream(raw, context):
                async for response in streaming(await request(raw, context), context):
                    yield response

            async def stream_stream(raw, context):
                async for response in streaming(requests(raw, context), context):
                    yield response

        return handler_like(handler, None, unary_unary, unary_stream, stream_unary, stream_stream)


class RequestDecoding(grpc.ServerInterceptor):
    """For thread-pool servers (grpc.server) whose servicer methods are plain functions."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        decode = handler.request_deserializer if handler is not None else None
        if decode is None:
            return handler
        method = details.method

        def request(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return decode(raw)
            except DecodeError as e:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, _problem(method, e))

        def requests(raw: Iterator[bytes], context) -> Iterator[Any]:
            for message in raw:
                try:
                    yield decode(message)
                except DecodeError as e:
                    _refuse_stream(context, method, e)
                    return

        return handler_like(
            handler,
            None,
            lambda raw, context: handler.unary_unary(request(raw, context), context),
            lambda raw, context: handler.unary_stream(request(raw, context), context),
            lambda raw, context: handler.stream_unary(requests(raw, context), context),
            lambda raw, context: handler.stream_stream(requests(raw, context), context),
        )
