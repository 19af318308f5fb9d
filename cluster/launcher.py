"""Starts a pagedserve cluster on Ray from a Config: worker actors, then the scheduler actor.

Cluster(config).start()  ->  the Serving address (host:port)
Cluster.shutdown()       ->  stops the actors, and the embedded Ray if this process started it
"""

import dataclasses
import logging
import os

import ray

from cluster.actors import SchedulerActor, WorkerActor
from cluster.config import Config
from cluster.models import resolve_model, resolve_tokenizer
from scheduler.serving import ReplicaSpec

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, config: Config) -> None:
        self.config = config
        model = config.model
        self.model_path = resolve_model(model.model, model.load_format)
        self.tokenizer_path = resolve_tokenizer(model.tokenizer, model.model, model.load_format)
        self.workers: list = []
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
                address=cfg.cluster.address,
                namespace=cfg.cluster.namespace,
                num_cpus=cfg.cluster.num_cpus if cfg.cluster.address is None else None,
                include_dashboard=False,
                log_to_driver=False,
            )
            self._owns_ray = True
        try:
            num_gpus = self._gpus_per_worker()
            tp = cfg.parallel.tensor_parallel_size
            self.workers = [WorkerActor.options(num_gpus=num_gpus).remote() for _ in range(tp)]
            addresses = ray.get([w.address.remote() for w in self.workers], timeout=timeout)
            master_port = ray.get(self.workers[0].free_port.remote(), timeout=timeout)
            replica = ReplicaSpec(
                worker_addresses=tuple(addresses),
                model_path=self.model_path,
                tokenizer_path=self.tokenizer_path,
                master_addr=addresses[0].rsplit(":", 1)[0],
                master_port=master_port,
            )
            self.scheduler = SchedulerActor.remote(
                replica, cfg.model, cfg.cache, cfg.scheduler, cfg.server, cfg.model.model
            )
            self.address = ray.get(self.scheduler.address.remote(), timeout=timeout)
        except BaseException:
            self.shutdown()
            raise
        log.info("pagedserve is serving on %s", self.address)
        return self.address

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
        self.scheduler, self.workers = None, []
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
