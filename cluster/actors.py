"""The Ray actors: thin hosts for the gRPC servers, which do the real work.

Ray places and supervises them; everything else travels over gRPC.
"""

import logging
import os
import socket
import sys

import ray

from cluster.config import Config


@ray.remote(num_cpus=0)
class WorkerActor:
    """One rank: hosts a Worker gRPC server on this node's address.

    cpu_ranks_on_node: for a rank that computes on the CPU, how many ranks of its replica this
    node holds (they share its cores: worker.threads); None for a GPU rank."""

    def __init__(self, log_level: str = "INFO", cpu_ranks_on_node: int | None = None) -> None:
        from worker.threads import configure_cpu_threads
        from worker.worker import WorkerServer

        logging.basicConfig(level=log_level)
        if cpu_ranks_on_node is not None:
            configure_cpu_threads(cpu_ranks_on_node)
        self._server = WorkerServer(host=ray.util.get_node_ip_address())

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

    def free_port(self) -> int:
        """A port free on this node now (rank 0's: the tensor-parallel group's rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def stop(self) -> None:
        self._server.stop()


@ray.remote(num_cpus=0)
class SchedulerActor:
    """The central scheduler: places every replica's workers (a RayPlacer, at start and on
    Scale), hosts the Serving gRPC server and drives them. What it places fate-shares with it."""

    def __init__(
        self, config: Config, model_path: str, tokenizer_path: str, gpus_per_worker: float
    ) -> None:
        from cluster.placement import RayPlacer
        from scheduler.serving import ServingServer

        logging.basicConfig(level=config.logging.level)
        # Each replica's engine thread wakes when its workers answer a step; with Python's
        # default 5 ms switch interval, the event loop thread streaming tokens to clients would
        # hold the GIL for up to 5 ms first, stalling every step of every replica.
        sys.setswitchinterval(0.0005)
        self._placer = RayPlacer(config, model_path, tokenizer_path, gpus_per_worker)
        try:
            replicas = [self._placer.place(r) for r in range(config.parallel.replicas)]
            self._server = ServingServer(
                replicas,
                config.model,
                config.cache,
                config.scheduler,
                config.server,
                config.model.model,
                placer=self._placer,
            )
        except BaseException:
            self._placer.release_all()
            raise

    def address(self) -> str:
        return self._server.address

    def pid(self) -> int:
        return os.getpid()

    def workers(self) -> list:
        """Every replica's worker actors, replica by replica, in rank order."""
        return self._placer.workers()

    def step_records(self) -> list[dict]:
        return self._server.step_records()

    def stop(self) -> None:
        """Stops serving, then every worker, and removes the placement groups."""
        self._server.stop()
        self._placer.release_all()
