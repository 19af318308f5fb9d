"""The Serving gRPC service (protos/serving.proto) of a frontend: a thin adapter over its
Backend. A ServingError becomes the call's status (code and sentence); Generate streams are
observed by the frontend's metrics, as the HTTP API's are."""

import grpc

from protos import serving_pb2, serving_pb2_grpc
from scheduler.frontend.backend import Backend, ServingError
from scheduler.frontend.metrics import Metrics


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, backend: Backend, metrics: Metrics) -> None:
        self.backend = backend
        self.metrics = metrics

    async def Generate(self, request, context):
        responses = self.metrics.track(request, self.backend.generate(request))
        try:
            async for response in responses:
                yield response
        except ServingError as e:
            await context.abort(e.code, e.message)
        finally:  # closed at once, so a cancelled call aborts its request now, not at GC
            await responses.aclose()

    async def Abort(self, request, context):
        found = await self._call(context, self.backend.abort(request.request_id))
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
