"""Replicas on Ray: each replica's workers in a placement group of their own (STRICT_PACK: one
node; PACK: preferably one), rank 0 first, on whatever nodes the cluster has when it is asked,
a node that joined later included.

The scheduler actor holds one RayPlacer for the replicas it starts with and for those that
Scale adds, so every worker and placement group it creates fate-shares with it.
"""

import logging
import threading
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.actors import WorkerActor
from cluster.config import Config
from protos import serving_pb2
from scheduler.core.replica import ReplicaSpec

log = logging.getLogger(__name__)

_CPU_WORKER_SHARE = 0.01  # of a CPU, per CPU worker: placement bundles cannot be empty
_STOP_TIMEOUT_S = 15.0


def gpus_per_worker(device: str) -> float:
    """1 when the workers run on GPUs (model.device cuda, or auto and Ray has a GPU), else 0."""
    if device == "cpu":
        return 0
    has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    if device == "cuda" and not has_gpu:
        raise ValueError("model.device is cuda, but the Ray cluster has no GPU")
    return 1 if has_gpu else 0


def gpus_seen(node_ids: list[str], gpu_ids: list[list[str]]) -> list[tuple[list[str], int]]:
    """Per rank, the GPUs its process is shown and which of them is its own: every GPU of the
    replica's ranks on its node, in rank order, the same list for all of them (each rank's
    device index differs: torch's symmetric memory tells ranks apart by it).
    node_ids[r], gpu_ids[r]: rank r's node and its Ray GPU ids (one each)."""
    seen = []
    for rank, node in enumerate(node_ids):
        on_node = [gpu for other, n in enumerate(node_ids) if n == node for gpu in gpu_ids[other]]
        seen.append((on_node, on_node.index(gpu_ids[rank][0])))
    return seen


@dataclass
class _Placed:
    group: PlacementGroup
    workers: list  # WorkerActor handles, rank order


class RayPlacer:
    """The Placer of scheduler.core.fleet on the Ray cluster this process is connected to."""

    def __init__(
        self,
        config: Config,
        model_path: str,
        num_gpus: float,
        secret: str,
        cluster_replicas: int | None = None,
    ) -> None:
        """secret: the cluster secret its workers demand of every call. cluster_replicas: the
        replicas of every engine core together (default: this config's). A CPU rank's torch
        threads are its node's cores over the CPU ranks taken to share them: its replica's
        ranks there times cluster_replicas, as if every replica ran on that node (a CPU cluster
        is one node as a rule; spread over several, each rank computes on fewer threads than it
        could, never on more than there are cores). Replicas added by Scale past it share the
        cores with those placed before."""
        self.config = config
        self._cluster_replicas = cluster_replicas or config.parallel.replicas
        self.model_path = model_path
        self.num_gpus = num_gpus  # per worker, decided once so that all replicas are alike
        self._secret = secret
        self._node_id = ray.get_runtime_context().get_node_id()  # the engine core's node
        self._placed: dict[int, _Placed] = {}
        self._lock = threading.Lock()

    def place(self, replica_id: int) -> ReplicaSpec:
        """T worker actors in one placement group, rank 0 first; raises RuntimeError when Ray
        cannot place them within cluster.startup_timeout_s."""
        cfg = self.config
        tp, timeout = cfg.parallel.tensor_parallel_size, cfg.cluster.startup_timeout_s
        strategy = cfg.cluster.placement_strategy
        # A bundle must hold some resource: a CPU worker reserves a token sliver of a CPU.
        bundle = {"GPU": self.num_gpus} if self.num_gpus else {"CPU": _CPU_WORKER_SHARE}
        placed = _Placed(placement_group([bundle] * tp, strategy=strategy), [])
        try:
            try:
                ray.get(placed.group.ready(), timeout=timeout)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"replica {replica_id}: Ray could not place {tp} workers of {bundle} with "
                    f"{strategy} within {timeout} s "
                    f"(available: {ray.available_resources()} of {ray.cluster_resources()})"
                ) from None
            # CPU ranks on one node share its cores (worker.threads): how many share each one's?
            # This replica's ranks there, times every replica of the cluster (__init__).
            nodes = placement_group_table(placed.group)["bundles_to_node_id"]
            ranks_on_node = [
                list(nodes.values()).count(nodes[rank]) * self._cluster_replicas
                for rank in range(tp)
            ]
            # A replica wholly on the core's node listens on loopback: off-node, none reach it.
            loopback = all(nodes[rank] == self._node_id for rank in range(tp))
            placed.workers = [
                WorkerActor.options(
                    num_gpus=self.num_gpus,
                    num_cpus=0 if self.num_gpus else _CPU_WORKER_SHARE,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placed.group, placement_group_bundle_index=rank
                    ),
                ).remote(
                    self._secret,
                    loopback,
                    cfg.logging.level,
                    None if self.num_gpus else ranks_on_node[rank],
                )
                for rank in range(tp)
            ]
            addresses = ray.get([w.address.remote() for w in placed.workers], timeout=timeout)
            node_ids = ray.get([w.node_id.remote() for w in placed.workers], timeout=timeout)
            if self.num_gpus >= 1 and tp > 1:
                gpu_ids = ray.get([w.gpu_ids.remote() for w in placed.workers], timeout=timeout)
                ray.get(
                    [
                        w.see_gpus.remote(seen, index)
                        for w, (seen, index) in zip(
                            placed.workers, gpus_seen(node_ids, gpu_ids), strict=True
                        )
                    ],
                    timeout=timeout,
                )
            # Ranks on one node meet through a file (nothing listens); across nodes through
            # the TCP store rank 0 serves.
            rank0 = placed.workers[0]
            store_path, master_port = "", 0
            if len(set(node_ids)) == 1:
                store_path = ray.get(rank0.rendezvous_file.remote(), timeout=timeout)
            else:
                master_port = ray.get(rank0.free_port.remote(), timeout=timeout)
        except BaseException:
            _free(placed)
            raise
        with self._lock:
            self._placed[replica_id] = placed
        return ReplicaSpec(
            worker_addresses=tuple(addresses),
            model_path=self.model_path,
            master_addr=addresses[0].rsplit(":", 1)[0],
            master_port=master_port,
            store_path=store_path,
            worker_node_ids=tuple(node_ids),
            worker_secret=self._secret,
        )

    def release(self, replica_id: int, failed: bool = False) -> None:
        """Stops the replica's workers (failed: kills them at once, unasked) and removes its
        placement group."""
        with self._lock:
            placed = self._placed.pop(replica_id, None)
        if placed is not None:
            _free(placed, ask=not failed)

    def release_all(self) -> None:
        """Releases every replica placed and not yet released."""
        with self._lock:
            placed, self._placed = list(self._placed.values()), {}
        for one in placed:
            _free(one)

    def workers(self) -> list:
        """Every placed replica's worker actors, replica by replica, in rank order."""
        with self._lock:
            return [w for placed in self._placed.values() for w in placed.workers]

    def nodes(self) -> list[serving_pb2.NodeInfo]:
        """Ray's nodes, dead ones included (alive false)."""
        return [
            serving_pb2.NodeInfo(
                node_id=node["NodeID"],
                address=node["NodeManagerAddress"],
                alive=node["Alive"],
                resources=node["Resources"],
            )
            for node in ray.nodes()
        ]


def _free(placed: _Placed, ask: bool = True) -> None:
    """Kills the workers, each asked to stop first if `ask` (a hung one would keep the caller
    waiting _STOP_TIMEOUT_S), and removes their placement group."""
    for actor in placed.workers:
        if ask:
            try:
                ray.get(actor.stop.remote(), timeout=_STOP_TIMEOUT_S)
            except Exception as e:  # already dead or unreachable: kill it regardless
                log.warning("stopping %s: %s", actor, e)
        ray.kill(actor)
    remove_placement_group(placed.group)
