"""Starts a pagedserve cluster on Ray from a Config, on this node: parallel.engine_cores
scheduler actors (the engine cores, each over its share of the replicas), each of which places
its replicas' worker actors in a placement group of their own (cluster.placement) and drives
them (it places more, or drains some, when asked to scale: its share of the count), and
server.frontends frontend actors sharing the Serving port in front of them, each routing its
requests over every engine core (scheduler.frontend.core_set); Ray starts a frontend that dies
again (FRONTEND_RESTARTS).

Cluster(config).start()  ->  the Serving address (host:port)
Cluster.shutdown()       ->  stops the actors, and the embedded Ray if this process started it
"""

import dataclasses
import logging
import os
import secrets
import shutil
import tempfile

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster.actors import FrontendActor, SchedulerActor
from cluster.config import Config, ConfigError
from cluster.models import resolve_model, resolve_tokenizer
from cluster.placement import gpus_per_worker
from cluster.preflight import check_before_loading, model_shape

log = logging.getLogger(__name__)

# A frontend process that dies, or that an engine core kills as hung, is started again by Ray
# (with the arguments it was created with: on the shared ports, connecting to every core as a
# new frontend), at most this many times over the cluster's life.
FRONTEND_RESTARTS = 100


class Cluster:
    def __init__(self, config: Config, source: str = "<config>") -> None:
        """source: where config was read (a file), named by the errors of its checks."""
        self.config = config
        self.source = source
        model = config.model
        self.model_path = resolve_model(model.model, model.load_format)
        self.tokenizer_path = resolve_tokenizer(model.tokenizer, model.model, model.load_format)
        self.schedulers: list = []  # SchedulerActor handles: the engine cores
        self.frontends: list = []  # FrontendActor handles
        self.address: str | None = None  # the Serving gRPC API's host:port
        self.http_url: str | None = None  # the OpenAI-compatible HTTP API's
        self.metrics_dir: str | None = None
        self._owns_ray = False
        # The cluster secret (protos/cluster_secret.py): new for every cluster, handed to the
        # engine core, its workers and the frontends through Ray only.
        self.secret = secrets.token_urlsafe(32)

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
            num_gpus = gpus_per_worker(cfg.model.device)
            # What the config and the model's own config show cannot work fails here, in a
            # second, not after every worker has loaded the model.
            try:
                shape = model_shape(self.model_path)
            except (OSError, KeyError, ValueError) as e:
                raise ConfigError(
                    f"{self.source}: model.model: cannot read the config of {self.model_path}: {e}"
                ) from None
            try:
                check_before_loading(cfg, shape, cpu_workers=not num_gpus)
            except ValueError as e:
                raise ConfigError(f"{self.source}: {e}") from None
            # The frontends are placed on this node too (below): the cores listen on loopback.
            # Each engine core is started with its share of the replicas as its whole config.
            core = SchedulerActor.options(num_cpus=0, scheduling_strategy=here)
            self.schedulers = [
                core.remote(
                    replace_sections(cfg, parallel={"replicas": n, "engine_cores": 1}),
                    self.model_path,
                    num_gpus,
                    self.secret,
                    loopback=True,
                    cluster_replicas=cfg.parallel.replicas,
                )
                for n in cfg.parallel.split()
            ]
            core_addresses = ray.get([s.address.remote() for s in self.schedulers], timeout=timeout)
            # The frontends listen while the workers load (NOT_SERVING until they serve); with
            # server.port or http_port 0 the first is given a free port and the others share it.
            # Their request metrics meet in one directory on this node (removed on shutdown).
            self.metrics_dir = tempfile.mkdtemp(prefix="pagedserve-metrics-")
            frontend = FrontendActor.options(
                num_cpus=0, scheduling_strategy=here, max_restarts=FRONTEND_RESTARTS
            )
            args = (cfg, core_addresses, self.secret, self.tokenizer_path, self.metrics_dir)
            self.frontends.append(frontend.remote(*args))
            ports = ray.get(self.frontends[0].ports.remote(), timeout=timeout)
            self.frontends += [
                frontend.remote(*args, ports) for _ in range(cfg.server.frontends - 1)
            ]
            ray.get([f.ports.remote() for f in self.frontends[1:]], timeout=timeout)
            self.address = f"{cfg.server.host}:{ports[0]}"
            scheme = "http" if cfg.server.tls_cert_file is None else "https"
            self.http_url = f"{scheme}://{cfg.server.host}:{ports[1]}"
            # Placing the workers, then loading the model: each within the timeout.
            ray.get([s.start.remote() for s in self.schedulers], timeout=2 * timeout)
            ray.get([f.wait_ready.remote(timeout) for f in self.frontends], timeout=2 * timeout)
        except BaseException:
            self.shutdown()
            raise
        log.info("pagedserve is serving on %s (gRPC) and %s (HTTP)", self.address, self.http_url)
        return self.address

    def workers(self) -> list:
        """Every replica's worker actors, engine core by engine core, replica by replica, in
        rank order."""
        per_core = ray.get([s.workers.remote() for s in self.schedulers], timeout=60)
        return [worker for workers in per_core for worker in workers]

    def step_records(self) -> list[dict]:
        """Every replica's recent steps, engine core by engine core."""
        per_core = ray.get([s.step_records.remote() for s in self.schedulers], timeout=60)
        return [record for records in per_core for record in records]

    def shutdown(self) -> None:
        """Stops the frontends, then the scheduler actors, each of which stops every worker it
        placed and removes their placement groups (both fate-share with it, should it not answer);
        the embedded Ray goes too if this process started it."""
        for frontend in self.frontends:
            try:
                ray.get(frontend.stop.remote(), timeout=30)
            except Exception as e:  # already dead or unreachable: kill it regardless
                log.warning("stopping a frontend: %s", e)
            ray.kill(frontend)
        self.frontends = []
        if self.metrics_dir is not None:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir = None
        for scheduler in self.schedulers:
            try:
                ray.get(scheduler.stop.remote(), timeout=120)
            except Exception as e:  # already dead or unreachable: kill it regardless
                log.warning("stopping an engine core: %s", e)
            ray.kill(scheduler)
        self.schedulers = []
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
