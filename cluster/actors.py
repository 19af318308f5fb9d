"""The Ray actors: thin hosts for the gRPC servers, which do the real work.

Ray places and supervises them; everything else travels over gRPC.
"""

import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace

import ray

from cluster.config import Config

log = logging.getLogger(__name__)


# The engine core's process takes at most 2 glibc malloc arenas (glibc's default: 8 per core).
# Each recovery builds the restarted replica (its page table's per-block lists, its engine) on
# new threads, and glibc gives each new thread the next of its arenas; the replica it replaces
# is freed into an arena that the next recoveries' threads seldom use again, so each recovery
# left a hole of a replica's size (3 MB with the soak's tiny model, 7.5 MB under its load) that
# the process kept: the core's RSS grew with every recovery until every arena had one. The core
# allocates under the GIL nearly always, so more arenas never bought it parallel speed.
_CORE_ENV = {"MALLOC_ARENA_MAX": "2"}
# The workers, which the core places, keep glibc's default (an empty value): Ray hands an
# actor's runtime_env down to the actors it creates, and theirs merges over it.
_WORKER_ENV = {"MALLOC_ARENA_MAX": ""}


@ray.remote(num_cpus=0, runtime_env={"env_vars": _WORKER_ENV})
class WorkerActor:
    """One rank: hosts a Worker gRPC server that serves only calls carrying the cluster secret,
    listening on loopback (loopback: its replica and the engine core share this node) or else
    on this node's address.

    cpu_ranks_on_node: for a rank that computes on the CPU, how many CPU ranks share this
    node's cores (worker.threads); None for a GPU rank."""

    def __init__(
        self, secret: str, loopback: bool, log_level: str, cpu_ranks_on_node: int | None
    ) -> None:
        from worker.threads import configure_cpu_threads
        from worker.worker import WorkerServer

        logging.basicConfig(level=log_level)
        # The next plan reaches Execute through its reader thread, which needs the GIL while the
        # Execute thread runs Python (answering the step before): at the default 5 ms switch
        # interval the plan waited and the device idled a millisecond a step at 256 running.
        sys.setswitchinterval(0.0002)
        if cpu_ranks_on_node is not None:
            configure_cpu_threads(cpu_ranks_on_node)
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        self._server = WorkerServer(host=host, secret=secret)
        self._rendezvous_dir: str | None = None

    def address(self) -> str:
        return self._server.address

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def torch_threads(self) -> int:
        """torch's intra-op threads in this worker process."""
        import torch

        return torch.get_num_threads()

    def gpu_ids(self) -> list[str]:
        """The GPUs Ray gave this rank, as CUDA_VISIBLE_DEVICES names them; none on a CPU rank."""
        return [str(i) for i in ray.get_gpu_ids()]

    def see_gpus(self, gpu_ids: list[str], index: int) -> None:
        """Shows this process gpu_ids, gpu_ids[index] its own, and starts CUDA on them: the
        ranks of a replica on one node can then map each other's memory (the one-shot
        all-reduce of worker.distributed). Ray shows each rank only its own GPU and sets that
        again before every actor call, so CUDA must start here, before any other use."""
        import torch

        if torch.cuda.is_initialized():
            raise RuntimeError("CUDA started in this worker before its GPUs were set")
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        if torch.cuda.is_available():  # else Ray's GPUs are fake ones (a simulated cluster)
            torch.cuda.init()
        self._server.service.cuda_index = index

    def free_port(self) -> int:
        """A port free on this node now (rank 0's: the tensor-parallel group's TCP store, for a
        replica across nodes)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def rendezvous_file(self) -> str:
        """A path not yet created in a new directory only this user may enter (rank 0's: the
        file through which a replica's ranks on this node meet, torch's FileStore). stop()
        removes the directory."""
        self._rendezvous_dir = tempfile.mkdtemp(prefix="pagedserve-tp-")
        return os.path.join(self._rendezvous_dir, "store")

    def stop(self) -> None:
        self._server.stop()
        if self._rendezvous_dir is not None:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)


@ray.remote(num_cpus=0, runtime_env={"env_vars": _CORE_ENV})
class SchedulerActor:
    """The engine core: its EngineCore gRPC server listens from construction (frontends connect
    to `address()`; on loopback if `loopback`: every frontend is on this node) and serves only
    calls carrying the cluster secret (protos/cluster_secret.py), which it also hands its
    workers and sends them with every call; start() places every replica's workers (a
    RayPlacer, also on Scale) and brings them up. What it places fate-shares with it.

    A frontend the core takes for hung (silent past its heartbeat's timeout) is killed, so
    that it takes no new client on the shared ports: with `loopback`, every frontend runs on
    this node and names its process on its stream."""

    def __init__(
        self,
        config: Config,
        model_path: str,
        gpus_per_worker: float,
        secret: str,
        loopback: bool,
        cluster_replicas: int,
    ) -> None:
        """cluster_replicas: the replicas of every engine core together (CPU workers on one
        node share its cores: RayPlacer)."""
        from cluster.placement import RayPlacer
        from scheduler.core.engine_core import EngineCore

        logging.basicConfig(level=config.logging.level)
        # Each replica's engine thread wakes when its workers answer a step; with Python's
        # default 5 ms switch interval, a thread sending outputs to the frontends would hold
        # the GIL for up to 5 ms first, stalling every step of every replica.
        sys.setswitchinterval(0.0005)
        # The scheduler's sizes a YAML leaves unset follow the workers' device from here on.
        config = replace(config, scheduler=config.scheduler.for_device(gpus_per_worker > 0))
        self._config = config
        self._placer = RayPlacer(config, model_path, gpus_per_worker, secret, cluster_replicas)
        host = "127.0.0.1" if loopback else ray.util.get_node_ip_address()
        on_hung = _kill_hung_frontend if loopback else None
        self._core = EngineCore(config.model.model, host, secret, on_hung=on_hung)

    def address(self) -> str:
        """The EngineCore service's address, for the frontends."""
        return self._core.address

    def start(self) -> None:
        """Places the configured replicas and brings them up (the frontends then serve)."""
        from scheduler.core.replica import EngineConfigs

        cfg = self._config
        try:
            specs = [self._placer.place(r) for r in range(cfg.parallel.replicas)]
            self._core.start(
                specs, EngineConfigs(cfg.model, cfg.cache, cfg.scheduler), placer=self._placer
            )
        except BaseException:
            self._placer.release_all()
            raise

    def pid(self) -> int:
        return os.getpid()

    def workers(self) -> list:
        """Every replica's worker actors, replica by replica, in rank order."""
        return self._placer.workers()

    def step_records(self) -> list[dict]:
        return self._core.fleet.step_records()

    def stop(self) -> None:
        """Stops serving the frontends, then every worker, and removes the placement groups."""
        self._core.stop()
        self._placer.release_all()


def _kill_hung_frontend(pid: int) -> None:
    """Kills a frontend process of this node that the engine core found hung (its requests are
    aborted already); its clients' streams break as if it had died."""
    if pid <= 0 or pid == os.getpid():  # a frontend that did not name itself, or the core
        return
    log.warning("killing the hung frontend process %d", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it died meanwhile


# The gRPC and HTTP ports every frontend shares, as the first one was given them (JSON), in the
# frontends' shared directory.
PORTS_FILE = "ports.json"
# A frontend started again takes connections on the shared ports at once, while it loads the
# tokenizer and hears the model from the core (a second or so): a call in that window waits
# this long for it rather than being refused UNAVAILABLE where the other frontends serve.
_RESTARTED_READY_WAIT_S = 10.0


@ray.remote(num_cpus=0)
class FrontendActor:
    """One frontend process: serves the Serving gRPC API on server.host:server.port and the
    OpenAI-compatible HTTP API on server.http_port (both shared with the other frontends) in
    front of the engine cores at core_addresses (routing its requests over them)."""

    def __init__(
        self,
        config: Config,
        core_addresses: list[str],
        core_secret: str,
        tokenizer_path: str,
        metrics_dir: str,
        ports: tuple[int, int] | None = None,
    ) -> None:
        """ports: the gRPC and HTTP ports the first frontend was given (where server.port or
        http_port is 0); None = the configured ones, or the first frontend's when it is started
        again (Ray restarts an actor with the arguments it was created with: the ports it was
        given are in PORTS_FILE). metrics_dir: the frontends' shared directory on this node
        (their metrics, PORTS_FILE). core_secret: the cluster secret the core demands."""
        import dataclasses
        import functools

        from scheduler.frontend.server import FrontendServer
        from scheduler.frontend.tokenizer import Tokenizer

        logging.basicConfig(level=config.logging.level)
        sys.setswitchinterval(0.0005)  # as the core's: streaming threads take turns promptly
        ports_file = os.path.join(metrics_dir, PORTS_FILE)
        restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted and ports is None:
            with open(ports_file) as f:
                ports = tuple(json.load(f))
        server = config.server
        if ports is not None:
            server = dataclasses.replace(server, port=ports[0], http_port=ports[1])
        self._server = FrontendServer(
            server,
            core_addresses,
            functools.partial(Tokenizer, tokenizer_path),
            config.model.model,
            metrics_dir,
            core_secret,
            ready_wait_s=_RESTARTED_READY_WAIT_S if restarted else 0.0,
        )
        if restarted:
            log.warning(
                "frontend started again, pid %d, ports %d and %d", os.getpid(), *self.ports()
            )
        if ports is None:  # the first frontend: the others, and its restarts, take its ports
            with open(ports_file + ".tmp", "w") as f:
                json.dump(self.ports(), f)
            os.replace(ports_file + ".tmp", ports_file)

    def ports(self) -> tuple[int, int]:
        """The gRPC and the HTTP port it listens on."""
        return self._server.port, self._server.http_port

    def pid(self) -> int:
        return os.getpid()

    def streamed(self) -> tuple[int, float | None, float | None]:
        """Output tokens this frontend has sent, when its last message went and when its last
        outputs came from the cores (FrontendServer.streamed)."""
        return self._server.streamed()

    def wait_ready(self, timeout: float) -> None:
        """Returns once this frontend serves (the core has brought the replicas up)."""
        self._server.wait_ready(timeout)

    def stop(self) -> None:
        self._server.stop()
