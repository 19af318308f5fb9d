"""The cluster secret: how a cluster's own processes prove themselves to each other.

`pagedserve up` draws one random secret per cluster and hands it to the engine core, every worker
it places and every frontend, through Ray (actor arguments): never in the YAML, never on disk.
Every call to a worker (worker.proto) and to the engine core (frontend.proto) carries it as the
metadata METADATA_KEY; ClusterSecretCheck, their servers' interceptor, refuses a call without
it, or with another one, UNAUTHENTICATED before any handler runs or any request is decoded.
"""

import hmac
from collections.abc import Callable

import grpc

METADATA_KEY = "pagedserve-cluster-secret"

# The method handler factories by (request streaming, response streaming).
_HANDLER_OF_KIND = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def secret_metadata(secret: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata a call carries to prove itself: none when secret is None."""
    return ((METADATA_KEY, secret),) if secret is not None else ()


class ClusterSecretCheck(grpc.ServerInterceptor):
    """Admits only calls that carry the secret (thread-pool gRPC servers)."""

    def __init__(self, secret: str, serves: str) -> None:
        """serves: what the server serves, for the refusal's sentence ("this worker serves its
        cluster's engine core")."""
        if not secret:
            raise ValueError("the cluster secret must not be empty")
        self._secret = secret.encode()
        self._serves = serves

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
            f"{self._serves} only: the call lacks {METADATA_KEY}"
            if given is None
            else f"{METADATA_KEY}: not this cluster's secret"
        )

        def refuse(request_or_iterator, context: grpc.ServicerContext):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        # Of the method's own kind, reading raw bytes: a refused call is never decoded.
        kind = (handler.request_streaming, handler.response_streaming)
        return _HANDLER_OF_KIND[kind](refuse, None, handler.response_serializer)
