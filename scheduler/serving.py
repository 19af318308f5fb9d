"""The Serving gRPC service (protos/serving.proto) and the server that owns the replicas.

ServingServer brings each replica's workers up over gRPC (InitDistributed, LoadModel,
ProfileMemory, InitCache), sizes its page table from their reports, starts one engine loop per
replica and serves clients on an asyncio gRPC server with grpc.health.v1 and reflection. A new
request goes to the replica the global page table picks (longest cached prefix, then load).
Given a Placer (the cluster's places workers with Ray), Scale changes the number of replicas:
new ones are placed and brought up the same way; removed ones drain (they take no new request,
answer what they hold, then their workers stop). The cluster runs it inside the scheduler's Ray
actor.
"""

import asyncio
import dataclasses
import logging
import threading
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc
from scheduler.auth import TokenAuthInterceptor
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from scheduler.engine import Delta, Engine, Sink
from scheduler.router import Router
from scheduler.logprobs import PositionLogprobs
from scheduler.outbox import Outbox
from scheduler.page_table import PageTableManager
from scheduler.request import Request
from scheduler.sampling_params import SamplingParams
from scheduler.scheduler import RequestRefused, Scheduler
from scheduler.frontend.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
_WORKER_RPC_TIMEOUT_S = 600.0
_DRAIN_POLL_S = 0.05  # how often a draining replica is checked for its last request
THROUGHPUT_WINDOW_S = 10.0  # GetServerInfo's generated tokens per second are over this window


@dataclass(frozen=True)
class ReplicaSpec:
    """Where a replica's workers listen (rank order) and where its model lives."""

    worker_addresses: tuple[str, ...]
    model_path: str
    tokenizer_path: str
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    worker_node_ids: tuple[str, ...] = ()  # each rank's cluster node, where the placer knows it


class Placer(Protocol):
    """Starts and stops replicas' workers on the cluster's machines (cluster/ does it with Ray).
    A server given one can scale."""

    def place(self, replica_id: int) -> ReplicaSpec:
        """Starts the workers of a new replica; raises RuntimeError, with a sentence, when the
        cluster has no room for them (and then holds nothing for it)."""
        ...

    def release(self, replica_id: int) -> None:
        """Stops a replica's workers and frees the resources they held."""
        ...

    def nodes(self) -> list[serving_pb2.NodeInfo]:
        """The cluster's nodes, for GetServerInfo."""
        ...


@dataclass
class Replica:
    """One replica as the server drives it: its workers and its engine loop (which owns the
    scheduler and the page table). A draining replica takes no new request."""

    replica_id: int
    spec: ReplicaSpec
    model_info: worker_pb2.ModelInfo
    engine: Engine
    draining: bool = False


class ServingServer:
    def __init__(
        self,
        replicas: Sequence[ReplicaSpec],
        model: ModelConfig,
        cache: CacheConfig,
        scheduler: SchedulerConfig,
        server: ServerConfig,
        model_name: str,
        placer: Placer | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("a server needs at least one replica")
        self.model_name = model_name
        self.placer = placer
        self.ready = False  # until the workers are up and their caches allocated
        # Replaced, never changed in place (readers take a snapshot), under _membership, which
        # also makes routing a request and enqueueing it one step that draining cannot split.
        self.replicas: list[Replica] = []
        self._membership = threading.Lock()
        self._scaling = threading.Lock()  # one Scale at a time
        self._configs = (model, cache, scheduler)
        self._next_replica_id = len(replicas)
        self._drains: list[threading.Thread] = []
        self._closed = threading.Event()
        self._retired: Counter[str] = Counter()  # drained replicas' totals (replaced, as above)
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
        for replica_id, (spec, sizes) in enumerate(zip(replicas, brought_up, strict=True)):
            self.replicas.append(self._start_engine(replica_id, spec, sizes))
        self.router = Router(
            [r.engine.scheduler for r in self.replicas], [r.engine.lock for r in self.replicas]
        )

    def _start_engine(
        self, replica_id: int, spec: ReplicaSpec, sizes: tuple[worker_pb2.ModelInfo, int, int]
    ) -> Replica:
        """Allocates the KV cache of a replica whose workers have loaded the model (sizes are
        _bring_up_workers' answer) and starts its engine loop."""
        info, num_blocks, num_cpu_blocks = sizes
        model, cache, scheduler = self._configs
        capacity = num_blocks * cache.block_size
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len={self.max_model_len} tokens does not fit the KV cache of "
                f"{num_blocks} blocks x {cache.block_size} = {capacity} tokens; lower "
                "model.max_model_len or give the cache more memory"
            )
        # Every rank at once: with tensor parallelism the ranks capture their CUDA graphs
        # together (the collectives inside them pair up across ranks).
        request = worker_pb2.InitCacheRequest(
            num_blocks=num_blocks,
            block_size=cache.block_size,
            num_cpu_blocks=num_cpu_blocks,
            max_num_seqs=scheduler.max_num_seqs,
            max_model_len=self.max_model_len,
            enforce_eager=model.enforce_eager,
        )
        channels = [grpc.insecure_channel(address) for address in spec.worker_addresses]
        try:
            calls = [
                worker_pb2_grpc.WorkerStub(channel).InitCache.future(
                    request, timeout=_WORKER_RPC_TIMEOUT_S
                )
                for channel in channels
            ]
            for call in calls:
                call.result()
        finally:
            for channel in channels:
                channel.close()
        page_table = PageTableManager(
            num_blocks, cache.block_size, cache.enable_prefix_caching, num_cpu_blocks
        )
        engine = Engine(
            Scheduler(scheduler, page_table), self.tokenizer, list(spec.worker_addresses)
        )
        return Replica(replica_id, spec, info, engine)

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
        tokens = server_cfg.tokens()
        self._server = grpc.aio.server(
            interceptors=[TokenAuthInterceptor(tokens)] if tokens else None,
            options=[("grpc.max_receive_message_length", server_cfg.max_request_bytes)],
        )
        service = ServingService(self, server_cfg.max_concurrent_requests)
        serving_pb2_grpc.add_ServingServicer_to_server(service, self._server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        address = f"{server_cfg.host}:{server_cfg.port}"
        if server_cfg.tls_cert_file is None:
            port = self._server.add_insecure_port(address)
        else:
            client_ca = server_cfg.read("tls_client_ca_file")
            credentials = grpc.ssl_server_credentials(
                [(server_cfg.read("tls_key_file"), server_cfg.read("tls_cert_file"))],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = self._server.add_secure_port(address, credentials)
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
        self._closed.set()
        for drain in self._drains:
            drain.join(timeout=10)
        for replica in self.replicas:
            replica.engine.stop()

    def submit(self, request: Request, sink: Sink) -> Engine:
        """Routes a new request to a serving replica and enqueues it there (what
        Engine.add_request raises, it raises); returns that replica's engine."""
        with self._membership:
            replica_id = self.router.route(request)
            engine = next(r.engine for r in self.replicas if r.replica_id == replica_id)
            engine.add_request(request, sink)
        return engine

    def scale(self, num_replicas: int) -> serving_pb2.ScaleResponse:
        """Brings the number of serving replicas to num_replicas (>= 1; needs a placer): places
        and brings up new ones, or sets the newest draining; answers once the new ones serve.
        Raises RuntimeError when a new replica cannot be placed (those placed before it serve)."""
        with self._scaling:
            serving = [r for r in self.replicas if not r.draining]
            added = [self._add_replica() for _ in range(num_replicas - len(serving))]
            with self._membership:
                draining = sorted(serving, key=lambda r: r.replica_id)[num_replicas:]
                for replica in draining:
                    self.router.remove(replica.replica_id)
                    replica.draining = True
                held = {r.replica_id: r.engine.num_unfinished() for r in draining}
            for replica in draining:
                log.info(
                    "replica %d drains %d requests", replica.replica_id, held[replica.replica_id]
                )
                drain = threading.Thread(
                    target=self._retire, args=(replica,), name="drain", daemon=True
                )
                drain.start()
                self._drains.append(drain)
            return serving_pb2.ScaleResponse(
                serving=[r.replica_id for r in self.replicas if not r.draining],
                added=added,
                draining=[r.replica_id for r in draining],
                num_draining_requests=sum(held.values()),
            )

    def _add_replica(self) -> int:
        """Places a new replica, brings it up and routes requests to it; returns its id."""
        replica_id = self._next_replica_id
        self._next_replica_id += 1
        model, cache, scheduler = self._configs
        spec = self.placer.place(replica_id)
        try:
            sizes = _bring_up_workers(spec, model, cache, scheduler)
            replica = self._start_engine(replica_id, spec, sizes)
        except BaseException:
            self.placer.release(replica_id)
            raise
        with self._membership:
            self.replicas = [*self.replicas, replica]
            self.router.add(replica_id, replica.engine.scheduler, replica.engine.lock)
        log.info("replica %d serves on %s", replica_id, ", ".join(spec.worker_addresses))
        return replica_id

    def _retire(self, replica: Replica) -> None:
        """Waits until a draining replica has answered every request it holds, then stops its
        engine and its workers (unless the whole server stops first: stop() takes it down)."""
        while replica.engine.num_unfinished():
            if self._closed.wait(_DRAIN_POLL_S):
                return
        engine = replica.engine
        engine.stop()
        with self._membership:
            self.replicas = [r for r in self.replicas if r is not replica]
            self._retired = self._retired + Counter(
                steps=engine.num_steps,
                finished=engine.num_finished,
                generated=engine.num_generated_tokens,
            )
        self.placer.release(replica.replica_id)
        log.info("replica %d drained and stopped", replica.replica_id)

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
        replicas, retired = self.replicas, self._retired  # snapshots
        engines = [replica.engine for replica in replicas]
        infos = [self._replica_info(replica) for replica in replicas]
        return serving_pb2.ServerInfoResponse(
            model=self.model_name,
            replicas=infos,
            num_steps=retired["steps"] + sum(e.num_steps for e in engines),
            num_finished_requests=retired["finished"] + sum(e.num_finished for e in engines),
            num_generated_tokens=retired["generated"]
            + sum(e.num_generated_tokens for e in engines),
            nodes=self.placer.nodes() if self.placer is not None else [],
            generated_tokens_per_s=sum(info.generated_tokens_per_s for info in infos),
            throughput_window_s=THROUGHPUT_WINDOW_S,
        )

    @staticmethod
    def _replica_info(replica: Replica) -> serving_pb2.ReplicaInfo:
        sched = replica.engine.scheduler
        pt, stats = sched.page_table, sched.stats
        spec = replica.spec
        node_ids = spec.worker_node_ids or ("",) * len(spec.worker_addresses)
        workers = [
            serving_pb2.WorkerInfo(
                rank=rank, address=address, device=replica.model_info.device, node_id=node_id
            )
            for rank, (address, node_id) in enumerate(
                zip(spec.worker_addresses, node_ids, strict=True)
            )
        ]
        throughput = replica.engine.generated_tokens_per_s(THROUGHPUT_WINDOW_S)
        with replica.engine.lock:
            return serving_pb2.ReplicaInfo(
                replica_id=replica.replica_id,
                state="draining" if replica.draining else "serving",
                generated_tokens_per_s=throughput,
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
        vocab = self.model_info.vocab_size
        if kind != "prompt_token_ids" and max(token_ids) >= vocab:
            raise ValueError(
                f"{kind}: the tokenizer gave token id {max(token_ids)}, outside the model's "
                f"vocabulary [0, {vocab}); model.tokenizer does not match the model"
            )
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"{kind} is {len(token_ids)} tokens long; it must be shorter than "
                f"max_model_len={self.max_model_len}"
            )
        params = SamplingParams.from_proto(msg.params)
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
    def __init__(self, server: ServingServer, max_concurrent_requests: int = 0) -> None:
        self.server = server
        self._outbox: Outbox | None = None  # made on the event loop, by the first Generate
        self.max_concurrent_requests = max_concurrent_requests  # 0 = no limit
        self.num_in_flight = 0  # Generate calls being served (on the event loop: no lock)

    async def _require_ready(self, context) -> None:
        if not self.server.ready:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly"
            )

    async def Generate(self, request, context):
        await self._require_ready(context)
        limit = self.max_concurrent_requests
        if limit and self.num_in_flight >= limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server.max_concurrent_requests={limit} requests are in flight; retry later",
            )
        self.num_in_flight += 1
        responses = self._generate(request, context)
        try:
            async for response in responses:
                yield response
        finally:  # closed at once, so a cancelled call aborts its request now, not at GC
            await responses.aclose()
            self.num_in_flight -= 1

    async def _generate(self, request, context):
        loop = asyncio.get_running_loop()
        try:
            req = await loop.run_in_executor(None, self.server.build_request, request)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        if self._outbox is None:
            self._outbox = Outbox(loop)
        try:
            engine = await loop.run_in_executor(
                None, self.server.submit, req, self._outbox.sink(deltas)
            )
        except RequestRefused as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(e))
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        unfinished = req.sampling_params.n  # completions; the stream ends when all have finished
        held: deque[Delta] = deque()  # taken from the queue, not sent yet
        try:
            while unfinished:
                delta = held.popleft() if held else await deltas.get()
                # A client that fell behind gets what piled up for a completion in one message.
                while not deltas.empty():
                    held.append(deltas.get_nowait())
                while held and _joinable(delta, held[0]):
                    delta = delta.then(held.popleft())
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
            weight_bytes=s.model_info.weight_bytes,
        )

    async def GetServerInfo(self, request, context):
        await self._require_ready(context)
        return await asyncio.get_running_loop().run_in_executor(None, self.server.server_info)

    async def Scale(self, request, context):
        await self._require_ready(context)
        if request.replicas < 1:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"replicas must be >= 1, got {request.replicas}"
            )
        if self.server.placer is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server cannot scale: it was started without a placer to start and stop "
                "workers (a cluster started by `pagedserve up` has one)",
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.server.scale, request.replicas)
        except RuntimeError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))


def _joinable(delta: Delta, later: Delta) -> bool:
    """Whether later may be sent in one message with delta: the same completion, still open."""
    return (
        later.index == delta.index
        and delta.finish_reason is None
        and delta.error is None
        and later.error is None
    )


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
