"""Bearer-token authentication for the Serving endpoint, as a gRPC server interceptor.

A call must carry the metadata "authorization: Bearer <token>" with one of the configured
tokens, or it is refused UNAUTHENTICATED before its handler runs. The health service stays open,
so load balancers and orchestrators can probe without a secret. Admin calls (Scale) need one of
the admin tokens, a role of their own: a client token is refused PERMISSION_DENIED.
"""

import hashlib
import hmac
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health

from scheduler.grpc_handlers import handler_like

_OPEN_SERVICES = (f"/{health.SERVICE_NAME}/",)
ADMIN_METHODS = frozenset({"/pagedserve.serving.Serving/Scale"})


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: frozenset[str], admin_tokens: frozenset[str] = frozenset()) -> None:
        """tokens: every accepted token (admin ones included); admin_tokens: those that may
        make admin calls."""
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._tokens = [t.encode() for t in tokens]
        self._admin_tokens = [t.encode() for t in admin_tokens]

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_SERVICES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization")
        problem = self._check(header)
        if problem is not None:
            return _refusal(handler, grpc.StatusCode.UNAUTHENTICATED, problem)
        if details.method in ADMIN_METHODS and not _matches(header, self._admin_tokens):
            name = details.method.rpartition("/")[2]
            return _refusal(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"{name} needs an admin token (server.admin_tokens); this one is a client's",
            )
        return handler

    def owner(self, header: str | None) -> str:
        """Who a call that passed the check is, as requests record their owner: "" for an admin
        (who may abort any request), else a digest of the token (never the token itself)."""
        if _matches(header, self._admin_tokens):
            return ""
        token = header.partition(" ")[2].strip().encode()
        return hashlib.sha256(b"pagedserve-owner:" + token).hexdigest()[:32]

    def _check(self, header: str | None) -> str | None:
        """None if the header names a configured token; else what is wrong with it."""
        if header is None:
            return 'this server needs "authorization: Bearer <token>" metadata'
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 'authorization metadata must read "Bearer <token>"'
        return (
            None if _matches(header, self._tokens) else "authorization: the token is not accepted"
        )


def _matches(header: str, tokens: list[bytes]) -> bool:
    """Whether the "Bearer <token>" header names one of tokens. Compared with every one, in
    constant time, so timing tells nothing of them."""
    token = header.partition(" ")[2].strip().encode()
    return any([hmac.compare_digest(token, t) for t in tokens])


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, problem: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as handler that aborts with code."""

    async def abort(request, context):
        await context.abort(code, problem)

    async def abort_stream(request, context):
        await context.abort(code, problem)
        yield  # an async generator, as streaming handlers are

    return handler_like(
        handler, handler.request_deserializer, abort, abort_stream, abort, abort_stream
    )
