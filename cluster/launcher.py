"""Starts a pagedserve cluster on Ray from a Config: the scheduler actor (on this node), which
places each replica's worker actors in a placement group of their own (cluster.placement) and
drives them all; it places more, or drains some, when asked to scale.

Cluster(config).start()  ->  the Serving address (host:port)
Cluster.shutdown()       ->  stops the actors, and the embedded Ray if this process started it
"""

import dataclasses
import logging
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.actors import SchedulerActor
from cluster.config import Config
from cluster.models import resolve_model, resolve_tokenizer
from cluster.placement import gpus_per_worker

log = logging.getLogger(__name__)


class Cluster:
    def __init__(self, config: Config) -> None:
        self.config = config
        model = config.model
        self.model_path = resolve_model(model.model, model.load_format)
        self.tokenizer_path = resolve_tokenizer(model.tokenizer, model.model, model.load_format)
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
            self.scheduler = SchedulerActor.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
            ).remote(cfg, self.model_path, self.tokenizer_path, gpus_per_worker(cfg.model.device))
            # Placing the workers, then loading the model: each within the timeout.
            self.address = ray.get(self.scheduler.address.remote(), timeout=2 * timeout)
        except BaseException:
            self.shutdown()
            raise
        log.info("pagedserve is serving on %s", self.address)
        return self.address

    def workers(self) -> list:
        """Every replica's worker actors, replica by replica, in rank order."""
        return ray.get(self.scheduler.workers.remote(), timeout=60)

    def step_records(self) -> list[dict]:
        return ray.get(self.scheduler.step_records.remote(), timeout=60)

    def shutdown(self) -> None:
        """Stops the scheduler actor, which stops every worker it placed and removes their
        placement groups (both fate-share with it, should it not answer); the embedded Ray goes
        too if this process started it."""
        if self.scheduler is not None:
            try:
                ray.get(self.scheduler.stop.remote(), timeout=120)
            except Exception as e:  # already dead or unreachable: kill it regardless
                log.warning("stopping the scheduler: %s", e)
            ray.kill(self.scheduler)
            self.scheduler = None
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
