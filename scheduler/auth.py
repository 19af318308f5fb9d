"""Bearer-token authentication for the Serving endpoint, as a gRPC server interceptor.

A call must carry the metadata "authorization: Bearer <token>" with one of the configured
tokens, or it is refused UNAUTHENTICATED before its handler runs. The health service stays open,
so load balancers and orchestrators can probe without a secret.
"""

import hmac
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health

from scheduler.grpc_handlers import handler_like

_OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: frozenset[str]) -> None:
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._tokens = [t.encode() for t in tokens]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_SERVICES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        problem = self._check(metadata.get("authorization"))
        return handler if problem is None else _refusal(handler, problem)

    def _check(self, header: str | None) -> str | None:
        """None if the header names a configured token; else what is wrong with it."""
        if header is None:
            return 'this server needs "authorization: Bearer <token>" metadata'
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 'authorization metadata must read "Bearer <token>"'
        # Compare with every token, in constant time, so timing tells nothing of them.
        matches = [hmac.compare_digest(token.strip().encode(), t) for t in self._tokens]
        return None if any(matches) else "authorization: the token is not accepted"


def _refusal(handler: grpc.RpcMethodHandler, problem: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as handler that aborts UNAUTHENTICATED."""

    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

    async def abort_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)
        yield  # an async generator, as streaming handlers are

    return handler_like(
        handler, handler.request_deserializer, abort, abort_stream, abort, abort_stream
    )
