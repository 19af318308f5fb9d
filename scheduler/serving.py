"""The Serving gRPC service (protos/serving.proto) and the server that owns the replicas.

ServingServer brings each replica's workers up over gRPC (InitDistributed, LoadModel,
ProfileMemory, InitCache), sizes its page table from their reports, starts one engine loop per
replica and serves clients on an asyncio gRPC server with grpc.health.v1 and reflection. A new
request goes to the replica the global page table picks (longest cached prefix, then load). The
cluster runs it inside the scheduler's Ray actor.
"""

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from scheduler.engine import Delta, Engine
from scheduler.global_page_table import GlobalPageTable
from scheduler.logprobs import PositionLogprobs
from scheduler.page_table import PageTableManager
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import RequestRefused, Scheduler
from scheduler.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
_WORKER_RPC_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Where a replica's workers listen (rank order) and where its model lives."""

    worker_addresses: tuple[str, ...]
    model_path: str
    tokenizer_path: str
    master_addr: str = "127.0.0.1"
    master_port: int = 0


@dataclass
class Replica:
    """One replica as the server drives it: its workers and its engine loop (which owns the
    scheduler and the page table)."""

    spec: ReplicaSpec
    model_info: worker_pb2.ModelInfo
    engine: Engine


class ServingServer:
    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        model: ModelConfig,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        server: ServerConfig,
        model_name: str,
    ) -> None:
        if not replicas:
            raise ValueError("a server needs at least one replica")
        self.model_name = model_name
        self.ready = False  # until the workers are up and their caches allocated
        self.replicas: list[Replica] = []
        # Serve from the start, NOT_SERVING while the model loads, so clients can watch it.
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
        try:
            self._bring_up(replicas, model, cache, scheduler)
        except BaseException:
            self.stop()
            raise
        asyncio.run_coroutine_threadsafe(self._set_health(True), self._loop).result(timeout=10)
        self.ready = True

    def _bring_up(
        self,
        replicas: Sequence[ReplicaSpec],
        model: ModelConfig,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
    ) -> None:
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer_future = pool.submit(Tokenizer, replicas[0].tokenizer_path)
            brought_up = [_bring_up_workers(spec, model, cache, scheduler) for spec in replicas]
            self.tokenizer = tokenizer_future.result()
        self.model_info = brought_up[0][0]
        limit = self.model_info.max_position_embeddings
        self.max_model_len = model.max_model_len or limit
        for spec, (info, num_blocks, num_cpu_blocks) in zip(replicas, brought_up, strict=True):
            capacity = num_blocks * cache.block_size
            if self.max_model_len > capacity:
                raise ValueError(
                    f"max_model_len={self.max_model_len} tokens does not fit the KV cache of "
                    f"{num_blocks} blocks x {cache.block_size} = {capacity} tokens; lower "
                    "model.max_model_len or give the cache more memory"
                )
            for address in spec.worker_addresses:
                worker_pb2_grpc.WorkerStub(grpc.insecure_channel(address)).InitCache(
                    worker_pb2.InitCacheRequest(
                        num_blocks=num_blocks,
                        block_size=cache.block_size,
                        num_cpu_blocks=num_cpu_blocks,
                    ),
                    timeout=_WORKER_RPC_TIMEOUT_S,
                )
            page_table = PageTableManager(
                num_blocks, cache.block_size, cache.enable_prefix_caching, num_cpu_blocks
            )
            engine = Engine(
                Scheduler(scheduler, page_table), self.tokenizer, list(spec.worker_addresses)
            )
            self.replicas.append(Replica(spec, info, engine))
        self.router = GlobalPageTable(
            [r.engine.scheduler for r in self.replicas], [r.engine.lock for r in self.replicas]
        )

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
        await self._set_health(False)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status.SERVING if serving else status.NOT_SERVING)

    def stop(self) -> None:
        async def _stop() -> None:
            await self.health.enter_graceful_shutdown()
            await self._server.stop(grace=1.0)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        for replica in self.replicas:
            replica.engine.stop()

    def route(self, request: Request) -> Engine:
        """The engine of the replica that should serve a new request."""
        return self.replicas[self.router.route(request)].engine

    def abort(self, request_id: str) -> bool:
        return any(replica.engine.abort(request_id) for replica in self.replicas)

    def step_records(self) -> list[dict]:
        """Every replica's recent steps, as dicts (replica by replica)."""
        return [
            dataclasses.asdict(record)
            for replica in self.replicas
            for record in list(replica.engine.step_records)
        ]

    def server_info(self) -> serving_pb2.ServerInfoResponse:
        engines = [replica.engine for replica in self.replicas]
        return serving_pb2.ServerInfoResponse(
            model=self.model_name,
            replicas=[self._replica_info(i, replica) for i, replica in enumerate(self.replicas)],
            num_steps=sum(e.num_steps for e in engines),
            num_finished_requests=sum(e.num_finished for e in engines),
            num_generated_tokens=sum(e.num_generated_tokens for e in engines),
        )

    @staticmethod
    def _replica_info(replica_id: int, replica: Replica) -> serving_pb2.ReplicaInfo:
        sched = replica.engine.scheduler
        pt, stats = sched.page_table, sched.stats
        workers = [
            serving_pb2.WorkerInfo(rank=rank, address=address, device=replica.model_info.device)
            for rank, address in enumerate(replica.spec.worker_addresses)
        ]
        with replica.engine.lock:
            return serving_pb2.ReplicaInfo(
                replica_id=replica_id,
                workers=workers,
                num_blocks=pt.num_blocks,
                num_free_blocks=pt.num_free_blocks,
                block_size=pt.block_size,
                num_running=len(sched.running),
                num_waiting=len(sched.waiting),
                num_swapped=len(sched.swapped),
                kv_usage=pt.usage,
                num_cpu_blocks=pt.num_host_blocks,
                num_free_cpu_blocks=pt.num_free_host_blocks,
                num_preemptions=stats.num_preemptions,
                num_swapped_out=stats.num_swapped_out,
                prefix_cache_queries=stats.prefix_cache_queries,
                prefix_cache_hits=stats.prefix_cache_hits,
                num_prompt_tokens_computed=stats.num_prompt_tokens_computed,
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
            n=p.n if p.HasField("n") else 1,
            min_p=p.min_p,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
            min_tokens=p.min_tokens,
            stop=list(p.stop),
            include_stop_str_in_output=p.include_stop_str_in_output,
            logprobs=p.logprobs if p.HasField("logprobs") else None,
        )
        return Request(
            request_id=msg.request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            sampling_params=params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            max_model_len=self.max_model_len,
            priority=msg.priority,
            cache_salt=msg.cache_salt,
        )


def _bring_up_workers(
    replica: ReplicaSpec, model: ModelConfig, cache: CacheConfig, scheduler: SchedulerConfig
) -> tuple[worker_pb2.ModelInfo, int, int]:
    """Runs each bring-up RPC on every rank at once (collectives need all ranks); returns
    rank 0's model info, the number of blocks every rank can hold, and the number of host
    blocks for swapping that fit cache.swap_space_gb on every rank."""
    stubs = [worker_pb2_grpc.WorkerStub(grpc.insecure_channel(a)) for a in replica.worker_addresses]

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
    if cache.num_blocks is not None and cache.swap_space_gb == 0:
        return infos[0], cache.num_blocks, 0
    reports = on_all(
        "ProfileMemory",
        worker_pb2.ProfileMemoryRequest(
            block_size=cache.block_size,
            max_num_batched_tokens=scheduler.max_num_batched_tokens,
            gpu_memory_utilization=cache.gpu_memory_utilization,
            cpu_cache_gb=cache.cpu_cache_gb,
        ),
    )
    num_blocks = cache.num_blocks or min(r.num_blocks for r in reports)
    if num_blocks < 1:
        raise ValueError(
            f"no KV cache block fits: the workers report {[r.num_blocks for r in reports]} "
            "blocks; raise cache.gpu_memory_utilization or cache.cpu_cache_gb"
        )
    bytes_per_block = max(r.bytes_per_block for r in reports)
    return infos[0], num_blocks, int(cache.swap_space_gb * (1 << 30)) // bytes_per_block


class ServingService(serving_pb2_grpc.ServingServicer):
    def __init__(self, server: ServingServer) -> None:
        self.server = server

    async def _require_ready(self, context) -> None:
        if not self.server.ready:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"
            )

    async def Generate(self, request, context):
        await self._require_ready(context)
        loop = asyncio.get_running_loop()
        try:
            req = await loop.run_in_executor(None, self.server.build_request, request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        engine = await loop.run_in_executor(None, self.server.route, req)
        try:
            engine.add_request(req, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d))
        except RequestRefused as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        unfinished = req.sampling_params.n  # completions; the stream ends when all have finished
        try:
            while unfinished:
                delta = await deltas.get()
                if delta.error is not None:
                    unfinished = 0
                    await context.abort(grpc.StatusCode.UNAVAILABLE, delta.error)
                response = serving_pb2.GenerateResponse(
                    request_id=req.request_id,
                    token_ids=delta.token_ids,
                    text=delta.text,
                    index=delta.index,
                    logprobs=_logprobs_to_proto(delta.logprobs),
                    cumulative_logprob=delta.cumulative_logprob,
                )
                if delta.finish_reason is not None:
                    unfinished -= 1
                    response.finish_reason = delta.finish_reason
                    response.usage.prompt_tokens = len(delta.prompt_token_ids)
                    response.prompt_token_ids.extend(delta.prompt_token_ids)
                    response.usage.completion_tokens = delta.num_output_tokens
                    response.usage.cached_tokens = delta.num_cached_tokens
                    response.timings.queue_ms = delta.queue_ms
                    response.timings.time_to_first_token_ms = delta.ttft_ms
                    response.timings.total_ms = delta.total_ms
                    if isinstance(delta.stop_reason, str):
                        response.stop_str = delta.stop_reason
                    elif delta.stop_reason is not None:
                        response.stop_token_id = delta.stop_reason
                yield response
        finally:
            if unfinished:  # the client cancelled or its deadline passed
                engine.abort(req.request_id)

    async def Abort(self, request, context):
        await self._require_ready(context)
        return serving_pb2.AbortResponse(found=self.server.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        await self._require_ready(context)
        s = self.server
        return serving_pb2.ModelInfoResponse(
            model=s.model_name,
            architecture=s.model_info.architecture,
            vocab_size=s.model_info.vocab_size,
            max_model_len=s.max_model_len,
            eos_token_ids=sorted(s.tokenizer.eos_token_ids),
        )

    async def GetServerInfo(self, request, context):
        await self._require_ready(context)
        return self.server.server_info()


def _logprobs_to_proto(
    logprobs: list[PositionLogprobs] | None,
) -> list[serving_pb2.TokenLogprobs]:
    return [
        serving_pb2.TokenLogprobs(
            entries=[
                serving_pb2.Logprob(
                    token_id=token,
                    logprob=lp.logprob,
                    rank=lp.rank,
                    decoded_token=lp.decoded_token or "",
                )
                for token, lp in position.items()
            ]
        )
        for position in logprobs or ()
    ]
