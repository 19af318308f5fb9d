"""Starts a pagedserve cluster on Ray from a Config: each replica's worker actors in a placement
group of their own, then the scheduler actor (on this node) that drives them all.

Cluster(config).start()  ->  the Serving address (host:port)
Cluster.shutdown()       ->  stops the actors, and the embedded Ray if this process started it
"""

import dataclasses
import logging
import os

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from cluster.actors import SchedulerActor, WorkerActor
from cluster.config import Config
from cluster.models import resolve_model, resolve_tokenizer
from scheduler.serving import ReplicaSpec

log = logging.getLogger(__name__)

_CPU_WORKER_SHARE = 0.01  # of a CPU, per CPU worker: placement bundles cannot be empty


class Cluster:
    def __init__(self, config: Config) -> None:
        self.config = config
        model = config.model
        self.model_path = resolve_model(model.model, model.load_format)
        self.tokenizer_path = resolve_tokenizer(model.tokenizer, model.model, model.load_format)
        self.workers: list = []  # every replica's worker actors
        self.placement_groups: list = []  # one per replica
        self.scheduler = None
        self.address: str | None = None
        self._owns_ray = False

    def start(self) -> str:
        """Brings the cluster up; returns the Serving gRPC address."""
        cfg = self.config
        timeout = cfg.cluster.startup_timeout_s
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if not ray.is_initialized():
            ray.init(
                address=cfg.cluster.address or "local",  # never join a stray local head
                namespace=cfg.cluster.namespace,
                num_cpus=cfg.cluster.num_cpus if cfg.cluster.address is None else None,
                include_dashboard=False,
                log_to_driver=False,
            )
            self._owns_ray = True
        try:
            replicas = [self._place_replica(r) for r in range(cfg.parallel.replicas)]
            self.scheduler = SchedulerActor.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
            ).remote(
                replicas,
                cfg.model,
                cfg.cache,
                cfg.scheduler,
                cfg.server,
                cfg.model.model,
                cfg.logging.level,
            )
            self.address = ray.get(self.scheduler.address.remote(), timeout=timeout)
        except BaseException:
            self.shutdown()
            raise
        log.info("pagedserve is serving on %s", self.address)
        return self.address

    def _place_replica(self, index: int) -> ReplicaSpec:
        """T worker actors in one placement group (STRICT_PACK: one node), rank 0 first."""
        cfg = self.config
        tp, timeout = cfg.parallel.tensor_parallel_size, cfg.cluster.startup_timeout_s
        num_gpus = self._gpus_per_worker()
        # A bundle must hold some resource: a CPU worker reserves a token sliver of a CPU.
        bundle = {"GPU": num_gpus} if num_gpus else {"CPU": _CPU_WORKER_SHARE}
        group = placement_group([bundle] * tp, strategy=cfg.cluster.placement_strategy)
        try:
            ray.get(group.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            raise RuntimeError(
                f"replica {index}: Ray could not place {tp} workers of {bundle} with "
                f"{cfg.cluster.placement_strategy} within {timeout} s "
                f"(cluster resources: {ray.cluster_resources()})"
            ) from None
        self.placement_groups.append(group)
        workers = [
            WorkerActor.options(
                num_gpus=num_gpus,
                num_cpus=0 if num_gpus else _CPU_WORKER_SHARE,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=rank
                ),
            ).remote(cfg.logging.level)
            for rank in range(tp)
        ]
        self.workers.extend(workers)
        addresses = ray.get([w.address.remote() for w in workers], timeout=timeout)
        return ReplicaSpec(
            worker_addresses=tuple(addresses),
            model_path=self.model_path,
            tokenizer_path=self.tokenizer_path,
            master_addr=addresses[0].rsplit(":", 1)[0],
            master_port=ray.get(workers[0].free_port.remote(), timeout=timeout),
        )

    def _gpus_per_worker(self) -> float:
        device = self.config.model.device
        if device == "cpu":
            return 0
        has_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        if device == "cuda" and not has_gpu:
            raise ValueError("model.device is cuda, but the Ray cluster has no GPU")
        return 1 if has_gpu else 0

    def step_records(self) -> list[dict]:
        return ray.get(self.scheduler.step_records.remote(), timeout=60)

    def shutdown(self) -> None:
        """Stops every actor; the embedded Ray goes too if this process started it."""
        actors = [a for a in (self.scheduler, *self.workers) if a is not None]
        for actor in actors:
            try:
                ray.get(actor.stop.remote(), timeout=15)
            except Exception as e:  # already dead or unreachable: kill it regardless
                log.warning("stopping %s: %s", actor, e)
            ray.kill(actor)
        for group in self.placement_groups:
            remove_placement_group(group)
        self.scheduler, self.workers, self.placement_groups = None, [], []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False


def replace_sections(config: Config, **sections: dict) -> Config:
    """A copy of config with some keys of some sections replaced (checked again)."""
    changes = {
        name: dataclasses.replace(getattr(config, name), **values)
        for name, values in sections.items()
        if values
    }
    return dataclasses.replace(config, **changes)
