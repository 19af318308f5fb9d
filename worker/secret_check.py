"""The worker's gRPC server interceptor that admits only calls carrying the cluster secret
(protos/cluster_secret.py): every other call is refused UNAUTHENTICATED before its handler runs,
so nothing reaches the model, the KV cache or Shutdown without it."""

import hmac
from collections.abc import Callable

import grpc

from protos.cluster_secret import METADATA_KEY

# The method handler factories by (request streaming, response streaming).
_HANDLER_OF_KIND = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class ClusterSecretCheck(grpc.ServerInterceptor):
    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._secret = secret.encode()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED
            return handler
        given = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        # Constant time: how long a refusal takes tells nothing of the secret.
        if isinstance(given, str) and hmac.compare_digest(given.encode(), self._secret):
            return handler
        problem = (
            f"this worker serves its cluster's engine core only: the call lacks {METADATA_KEY}"
            if given is None
            else f"{METADATA_KEY}: not this cluster's secret"
        )

        def refuse(request_or_iterator, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        # Of the method's own kind, reading raw bytes: a refused call is never decoded.
        kind = (handler.request_streaming, handler.response_streaming)
        return _HANDLER_OF_KIND[kind](refuse, None, handler.response_serializer)
