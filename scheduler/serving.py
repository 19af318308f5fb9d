"""The Serving gRPC service (protos/serving.proto) and the server that owns one replica.

ServingServer brings the replica's workers up over gRPC (InitDistributed, LoadModel,
ProfileMemory, InitCache), sizes the page table from their reports, starts the engine loop and
serves clients on an asyncio gRPC server with grpc.health.v1 and reflection. The cluster runs it
inside the scheduler's Ray actor.
"""

import asyncio
import logging
import threading
import uuid
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from scheduler.engine import Delta, Engine
from scheduler.page_table import PageTableManager
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import Scheduler
from scheduler.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
_WORKER_RPC_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Where a replica's workers listen (rank order) and where its model lives."""

    worker_addresses: tuple[str, ...]
    model_path: str
    master_addr: str = "127.0.0.1"
    master_port: int = 0


class ServingServer:
    def __init__(
        self,
        replica: ReplicaSpec,
        model: ModelConfig,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        server: ServerConfig,
        model_name: str,
    ) -> None:
        self.model_name = model_name
        self.replica = replica
        stubs = [
            worker_pb2_grpc.WorkerStub(grpc.insecure_channel(a)) for a in replica.worker_addresses
        ]
        with futures.ThreadPoolExecutor(max_workers=len(stubs) + 1) as pool:
            tokenizer_future = pool.submit(Tokenizer, replica.model_path)
            self.model_info, num_blocks = _bring_up_workers(stubs, replica, model, cache, scheduler)
            self.tokenizer = tokenizer_future.result()
        limit = self.model_info.max_position_embeddings
        self.max_model_len = model.max_model_len or limit
        capacity = num_blocks * cache.block_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len={self.max_model_len} tokens does not fit the KV cache of "
                f"{num_blocks} blocks x {cache.block_size} = {capacity} tokens; lower "
                "model.max_model_len or give the cache more memory"
            )
        self.page_table = PageTableManager(num_blocks, cache.block_size)
        for stub in stubs:
            stub.InitCache(
                worker_pb2.InitCacheRequest(num_blocks=num_blocks, block_size=cache.block_size),
                timeout=_WORKER_RPC_TIMEOUT_S,
            )
        self.engine = Engine(
            Scheduler(scheduler, self.page_table), self.tokenizer, list(replica.worker_addresses)
        )
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(
            target=self._serve, args=(server,), name="serving", daemon=True
        )
        self._thread.start()
        if not self._started.wait(timeout=30):
            raise RuntimeError("the Serving gRPC server did not start within 30 s")
        if self._start_error is not None:
            raise self._start_error

    def _serve(self, server_cfg: ServerConfig) -> None:
        asyncio.set_event_loop(self._loop)
        self._start_error: Exception | None = None
        try:
            self._loop.run_until_complete(self._start(server_cfg))
        except Exception as e:
            self._start_error = e
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    async def _start(self, server_cfg: ServerConfig) -> None:
        self._server = grpc.aio.server()
        serving_pb2_grpc.add_ServingServicer_to_server(ServingService(self), self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        port = self._server.add_insecure_port(f"{server_cfg.host}:{server_cfg.port}")
        if port == 0:
            raise RuntimeError(f"cannot listen on {server_cfg.host}:{server_cfg.port}")
        self.address = f"{server_cfg.host}:{port}"
        await self._server.start()
        # The model is loaded and the cache allocated by now: only now is the server SERVING.
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self) -> None:
        async def _stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace=1.0)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self.engine.stop()

    def server_info(self) -> serving_pb2.ServerInfoResponse:
        sched = self.engine.scheduler
        replica = serving_pb2.ReplicaInfo(
            replica_id=0,
            workers=[
                serving_pb2.WorkerInfo(rank=rank, address=address, device=self.model_info.device)
                for rank, address in enumerate(self.replica.worker_addresses)
            ],
            num_blocks=self.page_table.num_blocks,
            num_free_blocks=self.page_table.num_free_blocks,
            block_size=self.page_table.block_size,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
        )
        return serving_pb2.ServerInfoResponse(
            model=self.model_name,
            replicas=[replica],
            num_steps=self.engine.num_steps,
            num_finished_requests=self.engine.num_finished,
            num_generated_tokens=self.engine.num_generated_tokens,
        )

    def build_request(self, msg: serving_pb2.GenerateRequest) -> Request:
        """Validates and tokenizes; raises ValueError with a sentence naming the bad field."""
        kind = msg.WhichOneof("input")
        if kind is None:
            raise ValueError("prompt: one of prompt, prompt_token_ids or messages is required")
        if kind == "prompt":
            if not msg.prompt:
                raise ValueError("prompt must not be empty")
            token_ids = self.tokenizer.encode(msg.prompt)
        elif kind == "prompt_token_ids":
            token_ids = list(msg.prompt_token_ids.ids)
            vocab = self.model_info.vocab_size
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})"
                )
        else:
            messages = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
            if not messages:
                raise ValueError("messages must not be empty")
            token_ids = self.tokenizer.apply_chat_template(messages)
        if not token_ids:
            raise ValueError(f"{kind} must not be empty")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"{kind} is {len(token_ids)} tokens long; it must be shorter than "
                f"max_model_len={self.max_model_len}"
            )
        p = msg.params
        params = SamplingParams(
            temperature=p.temperature if p.HasField("temperature") else 1.0,
            top_p=p.top_p if p.HasField("top_p") else 1.0,
            top_k=p.top_k if p.HasField("top_k") else 0,
            max_tokens=p.max_tokens if p.HasField("max_tokens") else 16,
            stop_token_ids=list(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            seed=p.seed if p.HasField("seed") else None,
            skip_special_tokens=p.skip_special_tokens
            if p.HasField("skip_special_tokens")
            else True,
        )
        return Request(
            request_id=msg.request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            max_model_len=self.max_model_len,
        )


def _bring_up_workers(
    stubs: list[worker_pb2_grpc.WorkerStub],
    replica: ReplicaSpec,
    model: ModelConfig,
    cache: CacheConfig,
    scheduler: SchedulerConfig,
) -> tuple[worker_pb2.ModelInfo, int]:
    """Runs each bring-up RPC on every rank at once (collectives need all ranks); returns
    rank 0's model info and the number of blocks every rank can hold."""

    def on_all(method: str, request) -> list:
        calls = [
            getattr(stub, method).future(request, timeout=_WORKER_RPC_TIMEOUT_S) for stub in stubs
        ]
        return [call.result() for call in calls]

    world = len(stubs)
    for stub in stubs:
        stub.Health(worker_pb2.Empty(), timeout=60, wait_for_ready=True)
    calls = [
        stub.InitDistributed.future(
            worker_pb2.InitDistributedRequest(
                rank=rank,
                world_size=world,
                master_addr=replica.master_addr,
                master_port=replica.master_port,
            ),
            timeout=_WORKER_RPC_TIMEOUT_S,
        )
        for rank, stub in enumerate(stubs)
    ]
    for call in calls:
        call.result()
    infos = on_all(
        "LoadModel",
        worker_pb2.LoadModelRequest(
            model_path=replica.model_path,
            load_format=model.load_format,
            dtype=model.dtype,
            device=model.device,
            seed=model.seed,
        ),
    )
    if cache.num_blocks is not None:
        return infos[0], cache.num_blocks
    reports = on_all(
        "ProfileMemory",
        worker_pb2.ProfileMemoryRequest(
            block_size=cache.block_size,
            max_num_batched_tokens=scheduler.max_num_batched_tokens,
            gpu_memory_utilization=cache.gpu_memory_utilization,
            cpu_cache_gb=cache.cpu_cache_gb,
        ),
    )
    num_blocks = min(r.num_blocks for r in reports)
    if num_blocks < 1:
        raise ValueError(
            f"no KV cache block fits: the workers report {[r.num_blocks for r in reports]} "
            "blocks; raise cache.gpu_memory_utilization or cache.cpu_cache_gb"
        )
    return infos[0], num_blocks


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, server: ServingServer) -> None:
        self.server = server

    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        try:
            req = await loop.run_in_executor(None, self.server.build_request, request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        try:
            self.server.engine.add_request(
                req, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)
            )
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        finished = False
        try:
            while True:
                delta = await deltas.get()
                if delta.error is not None:
                    finished = True
                    await context.abort(grpc.StatusCode.UNAVAILABLE, delta.error)
                response = serving_pb2.GenerateResponse(
                    request_id=req.request_id, token_ids=delta.token_ids, text=delta.text
                )
                if delta.finish_reason is not None:
                    finished = True
                    response.finish_reason = delta.finish_reason
                    response.usage.prompt_tokens = len(delta.prompt_token_ids)
                    response.prompt_token_ids.extend(delta.prompt_token_ids)
                    response.usage.completion_tokens = delta.num_output_tokens
                yield response
                if finished:
                    return
        finally:
            if not finished:  # the client cancelled or its deadline passed
                self.server.engine.abort(req.request_id)

    async def Abort(self, request, context):
        return serving_pb2.AbortResponse(found=self.server.engine.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        s = self.server
        return serving_pb2.ModelInfoResponse(
            model=s.model_name,
            architecture=s.model_info.architecture,
            vocab_size=s.model_info.vocab_size,
            max_model_len=s.max_model_len,
            eos_token_ids=sorted(s.tokenizer.eos_token_ids),
        )

    async def GetServerInfo(self, request, context):
        return self.server.server_info()
