"""The Worker gRPC service of one rank (protos/worker.proto), and the server that hosts it.

The cluster runs a WorkerServer inside a Ray actor; everything the scheduler asks of a worker
arrives over gRPC.
"""

import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch

from protos import keepalive, worker_pb2, worker_pb2_grpc
from protos.cluster_secret import ClusterSecretCheck
from worker import distributed
from worker.loader import load_model
from worker.model_runner import LaunchedStep, ModelRunner

log = logging.getLogger(__name__)

_SERVES = "this worker serves its cluster's engine core"  # a refusal's sentence
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, cuda_index: int = 0) -> torch.device:
    """The device a rank computes on: cuda_index among the CUDA devices its process sees."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but this worker sees no CUDA device")
        return torch.device("cuda", cuda_index)
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def profile_plan(
    num_tokens: int, max_positions: int, block_size: int
) -> tuple[worker_pb2.StepPlan, int]:
    """The memory profile's step: num_tokens prompt tokens in one sequence, or in as many as the
    model's context needs (no position beyond max_positions: a step never holds one, and the
    rotary tables end there), on blocks 0.. in order; and how many blocks it takes."""
    lengths = [max_positions] * (num_tokens // max_positions) + [num_tokens % max_positions]
    requests, num_blocks = [], 0
    for i, length in enumerate(n for n in lengths if n):
        blocks = -(-length // block_size)
        requests.append(
            worker_pb2.NewRequest(
                request_id=f"profile-{i}",
                token_ids=[0] * length,
                sampling=worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0),
                block_ids=list(range(num_blocks, num_blocks + blocks)),
                num_scheduled_tokens=length,
            )
        )
        num_blocks += blocks
    return worker_pb2.StepPlan(new_requests=requests), num_blocks


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """The handlers run on the gRPC server's threads: each one that touches CUDA first makes
    this rank's device current on its thread (CUDA's current device is per thread, and kernel
    launches, graphs, streams and events take the current one)."""

    def __init__(self, on_shutdown: threading.Event) -> None:
        self.rank = 0
        self.world_size = 1
        self.runner: ModelRunner | None = None
        self.device = torch.device("cpu")
        # Which of the CUDA devices this process sees is this rank's: 0, unless the process
        # sees its replica-mates' too (cluster/actors.py, for the one-shot all-reduce).
        self.cuda_index = 0
        self._on_shutdown = on_shutdown
        self._ready = False

    def InitDistributed(self, request, context):
        self.rank, self.world_size = request.rank, request.world_size
        distributed.init(
            request.rank,
            request.world_size,
            request.master_addr,
            request.master_port,
            request.store_path,
        )
        return worker_pb2.Empty()

    def LoadModel(self, request, context):
        try:
            self.device = resolve_device(request.device, self.cuda_index)
            self._use_device()
            dtype = resolve_dtype(request.dtype, self.device)
            torch.manual_seed(request.seed)
            model = load_model(
                request.model_path, request.load_format, dtype, self.device, request.seed
            )
        except (ValueError, FileNotFoundError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.runner = ModelRunner(model, self.device, dtype, request.seed)
        distributed.enable_small_all_reduce(dtype, self.device)
        num_layers, kv_heads, head_dim = model.kv_cache_spec()
        return worker_pb2.ModelInfo(
            architecture=type(model).__name__,
            vocab_size=model.vocab_size,
            num_layers=num_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=model.max_positions,
            device=_device_name(self.device),
            dtype=str(dtype).removeprefix("torch."),
            weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            all_reduce=distributed.all_reduce_kind(),
        )

    def ProfileMemory(self, request, context):
        runner = self._runner(context)
        self._use_device()
        per_block = runner.bytes_per_block(request.block_size)
        if self.device.type == "cuda":
            peak = self._profile_cuda_peak(
                runner, request.block_size, request.max_num_batched_tokens, request.max_num_seqs
            )
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = int(total * request.gpu_memory_utilization) - peak
        else:
            peak = 0
            budget = int(request.cpu_cache_gb * (1 << 30))
        return worker_pb2.ProfileMemoryResponse(
            num_blocks=max(budget // per_block, 0), bytes_per_block=per_block, peak_bytes=peak
        )

    @staticmethod
    def _profile_cuda_peak(
        runner: ModelRunner, block_size: int, num_tokens: int, num_rows: int
    ) -> int:
        """Peak bytes of a forward pass over num_tokens tokens (profile_plan), then of sampling
        num_rows rows with every option on (ModelRunner.profile_sampler), plus the weights."""
        plan, num_blocks = profile_plan(num_tokens, runner.model.max_positions, block_size)
        runner.init_cache(num_blocks, block_size)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        runner.execute(plan)
        runner.profile_sampler(num_rows)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        runner.init_cache(0, block_size)
        torch.cuda.empty_cache()
        return peak - num_blocks * runner.bytes_per_block(block_size)

    def InitCache(self, request, context):
        runner = self._runner(context)
        self._use_device()
        runner.init_cache(
            request.num_blocks,
            request.block_size,
            request.num_cpu_blocks,
            max_num_seqs=request.max_num_seqs,
            max_model_len=request.max_model_len,
            enforce_eager=request.enforce_eager,
            max_num_batched_tokens=request.max_num_batched_tokens,
        )
        if self.device.type == "cuda":  # Triton compiles on CUDA only
            runner.warm_up()
        self._ready = True
        return worker_pb2.Empty()

    def Execute(self, request_iterator, context) -> Iterator[worker_pb2.StepResult]:
        """Launches each plan as soon as it arrives, before it answers the step in flight when
        the next plan is already here (model_runner's module doc): StepResults in order.

        With a step in flight and no plan behind it, the loop waits for whichever comes first:
        the next plan (launched at once, so the device runs it straight after the step in
        flight) or the step's tokens (answered at once). A reader thread puts the plans and a
        watcher thread the finished steps on one queue."""
        runner = self._runner(context)
        self._use_device()
        events: queue.SimpleQueue = queue.SimpleQueue()  # plans, None (the end), _Finished
        watched: queue.SimpleQueue = queue.SimpleQueue()  # launched steps to watch, None: stop

        def read() -> None:
            try:
                for plan in request_iterator:
                    events.put(plan)
            except grpc.RpcError:  # the stream broke (its client went away): it ended
                pass
            finally:
                events.put(None)

        def watch() -> None:
            self._use_device()
            while (step := watched.get()) is not None:
                runner.wait(step)
                events.put(_Finished(step))

        threading.Thread(target=read, name="execute-reader", daemon=True).start()
        threading.Thread(target=watch, name="execute-watcher", daemon=True).start()
        in_flight: tuple[worker_pb2.StepPlan, LaunchedStep, float] | None = None
        try:
            while True:
                plan = events.get()
                if isinstance(plan, _Finished):  # a step's tokens arrived: answer it if unanswered
                    if in_flight is not None and plan.step is in_flight[1]:
                        yield self._answer(runner, *in_flight)
                        in_flight = None
                    continue
                launched = None
                if plan is not None:
                    start = time.perf_counter()
                    launched = (plan, runner.launch(plan), start)
                    watched.put(launched[1])
                if in_flight:
                    yield self._answer(runner, *in_flight)
                in_flight = launched
                if plan is None:
                    return
        finally:
            watched.put(None)

    def _answer(
        self, runner: ModelRunner, plan: worker_pb2.StepPlan, step: LaunchedStep, start: float
    ) -> worker_pb2.StepResult:
        result = runner.finish(step)
        if self.rank != 0:  # rank 0 alone answers the tokens
            result = worker_pb2.StepResult()
        result.step_id = plan.step_id
        result.execute_ms = (time.perf_counter() - start) * 1e3
        return result

    def Health(self, request, context):
        return worker_pb2.HealthResponse(
            ready=self._ready, device=str(self.device), rank=self.rank, pid=os.getpid()
        )

    def Shutdown(self, request, context):
        self._on_shutdown.set()
        return worker_pb2.Empty()

    def _use_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _runner(self, context) -> ModelRunner:
        if self.runner is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "LoadModel has not been called")
        return self.runner


class WorkerServer:
    """Hosts the Worker service on host:port (port 0 picks a free one).

    host: where the engine core reaches it, no wider: loopback when they share a node.
    secret: the cluster secret every call must carry (protos/cluster_secret.py), or it is
    refused UNAUTHENTICATED; None serves every call, for a worker inside a test's process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, secret: str | None = None) -> None:
        self.shutdown_requested = threading.Event()
        self.service = WorkerService(self.shutdown_requested)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            interceptors=[ClusterSecretCheck(secret, _SERVES)] if secret is not None else [],
            # The core pings this server (protos/keepalive.py): a stopped worker is found.
            options=[("grpc.max_receive_message_length", 256 << 20), *keepalive.SERVER_OPTIONS],
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(self.service, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        self._server.start()
        self.address = f"{host}:{bound}"

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait(timeout=grace + 5)
        distributed.destroy()


@dataclass(frozen=True)
class _Finished:
    """Posted by Execute's watcher: this launched step's tokens are on the host."""

    step: LaunchedStep
