"""Building a gRPC method handler of another's shape, for server interceptors that replace
what a method does (refuse it, decode its requests themselves)."""

from collections.abc import Callable

import grpc


def handler_like(
    handler: grpc.RpcMethodHandler,
    deserialize: Callable | None,
    unary_unary: Callable,
    unary_stream: Callable,
    stream_unary: Callable,
    stream_stream: Callable,
) -> grpc.RpcMethodHandler:
    """A handler of handler's kind (unary or stream request and response) and response
    serializer, running the behavior given for that kind; deserialize None: raw bytes in."""
    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)
