"""One replica as the engine core drives it: its workers (one WorkerClient each), brought up over
gRPC (InitDistributed, LoadModel, ProfileMemory, InitCache), and its engine loop, which owns the
scheduler and the page table sized from the workers' reports.
"""

import enum
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from protos import serving_pb2, worker_pb2
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig
from scheduler.core.engine import Engine
from scheduler.core.page_table import PageTableManager
from scheduler.core.scheduler import Scheduler
from scheduler.core.worker_client import WorkerClient, call_all

log = logging.getLogger(__name__)

_WORKER_UP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ReplicaSpec:
    """Where a replica's workers listen (rank order) and where its model lives."""

    worker_addresses: tuple[str, ...]
    model_path: str
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    # A file the ranks meet through when they share a node (no port then), else "".
    store_path: str = ""
    worker_node_ids: tuple[str, ...] = ()  # each rank's cluster node, where the placer knows it
    # The cluster secret the workers demand (protos/cluster_secret.py); None: they demand none.
    worker_secret: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class EngineConfigs:
    """The config sections a replica is built from."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig


class ReplicaState(enum.Enum):
    """A replica's life as GetServerInfo shows it. Only a serving one is routed to."""

    SERVING = "serving"
    DRAINING = "draining"  # takes no new request, answers what it holds, then stops
    FAILED = "failed"  # a worker failed: its requests went to the others; it waits to restart
    RECOVERING = "recovering"  # its workers are being placed and brought up again


class Replica:
    """A replica that serves: its workers hold the model and the KV cache, its engine runs. A
    draining replica takes no new request."""

    def __init__(
        self,
        replica_id: int,
        spec: ReplicaSpec,
        configs: EngineConfigs,
        on_failure: Callable[["Replica"], None] | None = None,
    ) -> None:
        """Brings the workers up and starts the engine; on failure closes what it opened.
        on_failure(replica) is called once a worker of the serving replica fails
        (Engine's on_failure)."""
        self.replica_id = replica_id
        self.spec = spec
        self.state = ReplicaState.SERVING
        self._workers = [
            WorkerClient(address, spec.worker_secret) for address in spec.worker_addresses
        ]
        try:
            self.model_info, num_blocks, num_cpu_blocks = self._load(configs)
            model, cache, scheduler = configs.model, configs.cache, configs.scheduler
            self.max_model_len = model.max_model_len or self.model_info.max_position_embeddings
            capacity = num_blocks * cache.block_size
            if self.max_model_len > capacity:
                raise ValueError(
                    f"max_model_len={self.max_model_len} tokens does not fit the KV cache of "
                    f"{num_blocks} blocks x {cache.block_size} = {capacity} tokens; lower "
                    "model.max_model_len or give the cache more memory"
                )
            # Every rank at once: with tensor parallelism the ranks capture their CUDA graphs
            # together (the collectives inside them pair up across ranks).
            call_all(
                self._workers,
                "InitCache",
                worker_pb2.InitCacheRequest(
                    num_blocks=num_blocks,
                    block_size=cache.block_size,
                    num_cpu_blocks=num_cpu_blocks,
                    max_num_seqs=scheduler.max_num_seqs,
                    max_model_len=self.max_model_len,
                    enforce_eager=model.enforce_eager,
                    max_num_batched_tokens=scheduler.max_num_batched_tokens,
                ),
            )
            page_table = PageTableManager(
                num_blocks, cache.block_size, cache.enable_prefix_caching, num_cpu_blocks
            )
            self.engine = Engine(
                Scheduler(scheduler, page_table),
                self._workers,
                on_failure=None if on_failure is None else self._failure_handler(on_failure),
            )
        except BaseException:
            self._close_workers()
            raise

    def _failure_handler(
        self, on_failure: Callable[["Replica"], None]
    ) -> Callable[[Engine], None]:
        """The engine's on_failure: on_failure(this replica). It holds the replica weakly:
        the replica holds the engine, and a cycle between them would keep a replaced replica
        (its page table, its engine's records: megabytes) until the cyclic garbage collector
        ran, which in a long-lived core is seldom; each recovery's RSS grew by one."""
        replica = weakref.ref(self)

        def failed(_: Engine) -> None:
            if (alive := replica()) is not None:  # else it was dropped, stopped: no failure
                on_failure(alive)

        return failed

    def _load(self, configs: EngineConfigs) -> tuple[worker_pb2.ModelInfo, int, int]:
        """Joins the ranks' group and loads the model on each; returns rank 0's model info,
        the number of blocks every rank can hold, and the number of host blocks for swapping
        that fit cache.swap_space_gb on every rank."""
        model, cache, scheduler = configs.model, configs.cache, configs.scheduler
        workers, spec = self._workers, self.spec
        self.worker_pids = [worker.wait_until_up(_WORKER_UP_TIMEOUT_S).pid for worker in workers]
        call_all(
            workers,
            "InitDistributed",
            [
                worker_pb2.InitDistributedRequest(
                    rank=rank,
                    world_size=len(workers),
                    master_addr=spec.master_addr,
                    master_port=spec.master_port,
                    store_path=spec.store_path,
                )
                for rank in range(len(workers))
            ],
        )
        infos = call_all(
            workers,
            "LoadModel",
            worker_pb2.LoadModelRequest(
                model_path=spec.model_path,
                load_format=model.load_format,
                dtype=model.dtype,
                device=model.device,
                seed=model.seed,
            ),
        )
        if cache.num_blocks is not None and cache.swap_space_gb == 0:
            return infos[0], cache.num_blocks, 0
        reports = call_all(
            workers,
            "ProfileMemory",
            worker_pb2.ProfileMemoryRequest(
                block_size=cache.block_size,
                max_num_batched_tokens=scheduler.max_num_batched_tokens,
                gpu_memory_utilization=cache.gpu_memory_utilization,
                cpu_cache_gb=cache.cpu_cache_gb,
                max_num_seqs=scheduler.max_num_seqs,
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

    def info(self, throughput_window_s: float) -> serving_pb2.ReplicaInfo:
        """The replica as GetServerInfo shows it."""
        engine, spec = self.engine, self.spec
        sched = engine.scheduler
        pt, stats = sched.page_table, sched.stats
        node_ids = spec.worker_node_ids or ("",) * len(spec.worker_addresses)
        workers = [
            serving_pb2.WorkerInfo(
                rank=rank,
                address=address,
                device=self.model_info.device,
                node_id=node_id,
                pid=pid,
                all_reduce=self.model_info.all_reduce,
            )
            for rank, (address, node_id, pid) in enumerate(
                zip(spec.worker_addresses, node_ids, self.worker_pids, strict=True)
            )
        ]
        throughput = engine.generated_tokens_per_s(throughput_window_s)
        with engine.lock:
            return serving_pb2.ReplicaInfo(
                replica_id=self.replica_id,
                state=self.state.value,
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

    def stop(self) -> None:
        """Stops the engine loop and closes the workers' channels (the workers keep running:
        the placer stops them)."""
        self.engine.stop()
        self._close_workers()

    def _close_workers(self) -> None:
        for worker in self._workers:
            worker.close()
