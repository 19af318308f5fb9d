"""Starts a pagedserve cluster on Ray from a Config, on this node: the scheduler actor (the
engine core), which places each replica's worker actors in a placement group of their own
(cluster.placement) and drives them all (it places more, or drains some, when asked to scale),
and server.frontends frontend actors sharing the Serving port in front of it.

Cluster(config).start()  ->  the Serving address (host:port)
Cluster.shutdown()       ->  stops the actors, and the embedded Ray if this process started it
"""

import dataclasses
import logging
import os

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.actors import FrontendActor, SchedulerActor
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
        self.frontends: list = []  # FrontendActor handles
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
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        try:
            self.scheduler = SchedulerActor.options(num_cpus=0, scheduling_strategy=here).remote(
                cfg, self.model_path, gpus_per_worker(cfg.model.device)
            )
            core_address = ray.get(self.scheduler.address.remote(), timeout=timeout)
            # The frontends listen while the workers load (NOT_SERVING until they serve); with
            # server.port 0 the first is given a free port and the others share it.
            frontend = FrontendActor.options(num_cpus=0, scheduling_strategy=here)
            self.frontends.append(frontend.remote(cfg, core_address, self.tokenizer_path))
            port = ray.get(self.frontends[0].port.remote(), timeout=timeout)
            self.frontends += [
                frontend.remote(cfg, core_address, self.tokenizer_path, port)
                for _ in range(cfg.server.frontends - 1)
            ]
            ray.get([f.port.remote() for f in self.frontends[1:]], timeout=timeout)
            self.address = f"{cfg.server.host}:{port}"
            # Placing the workers, then loading the model: each within the timeout.
            ray.get(self.scheduler.start.remote(), timeout=2 * timeout)
            ray.get([f.wait_ready.remote(timeout) for f in self.frontends], timeout=2 * timeout)
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
        """Stops the frontends, then the scheduler actor, which stops every worker it placed
        and removes their placement groups (both fate-share with it, should it not answer);
        the embedded Ray goes too if this process started it."""
        for frontend in self.frontends:
            try:
                ray.get(frontend.stop.remote(), timeout=30)
            except Exception as e:  # already dead or unreachable: kill it regardless
                log.warning("stopping a frontend: %s", e)
            ray.kill(frontend)
        self.frontends = []
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
