"""The Serving gRPC service (protos/serving.proto) of a frontend: a thin adapter over its
Backend. A ServingError becomes the call's status (code and sentence); Generate streams are
observed by the frontend's metrics, as the HTTP API's are. With tokens, a request is its
submitter's: only the same token (or an admin's) finds it to Abort."""

import grpc

from protos import serving_pb2, serving_pb2_grpc
from scheduler.auth import TokenAuthInterceptor
from scheduler.frontend.backend import Backend, ServingError
from scheduler.frontend.metrics import Metrics


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(
        self, backend: Backend, metrics: Metrics, auth: TokenAuthInterceptor | None = None
    ) -> None:
        """auth: the server's token check (None: no tokens, every caller is the same owner)."""
        self.backend = backend
        self.metrics = metrics
        self.auth = auth

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        """Who the caller is; it aborts only the requests it submitted."""
        if self.auth is None:
            return ""
        return self.auth.owner(dict(context.invocation_metadata() or ()).get("authorization"))

    async def Generate(self, request, context):
        generate = self.backend.generate(request, self._owner(context))
        responses = self.metrics.track(request, generate)
        try:
            async for response in responses:
                yield response
        except ServingError as e:
            await context.abort(e.code, e.message)
        finally:  # closed at once, so a cancelled call aborts its request now, not at GC
            await responses.aclose()

    async def Abort(self, request, context):
        abort = self.backend.abort(request.request_id, self._owner(context))
        found = await self._call(context, abort)
        return serving_pb2.AbortResponse(found=found)

    async def GetModelInfo(self, request, context):
        return await self._call(context, self.backend.model_info())

    async def GetServerInfo(self, request, context):
        return await self._call(context, self.backend.server_info())

    async def Scale(self, request, context):
        return await self._call(context, self.backend.scale(request.replicas))

    @staticmethod
    async def _call(context: grpc.aio.ServicerContext, call):
        try:
            return await call
        except ServingError as e:
            await context.abort(e.code, e.message)
