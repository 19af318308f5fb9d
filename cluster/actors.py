"""The Ray actors: thin hosts for the gRPC servers, which do the real work.

Ray places and supervises them; everything else travels over gRPC.
"""

import logging
import os
import socket

import ray


@ray.remote(num_cpus=0)
class WorkerActor:
    """One rank: hosts a Worker gRPC server on this node's address."""

    def __init__(self, log_level: str = "INFO") -> None:
        from worker.worker import WorkerServer

        logging.basicConfig(level=log_level)
        self._server = WorkerServer(host=ray.util.get_node_ip_address())

    def address(self) -> str:
        return self._server.address

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()

    def free_port(self) -> int:
        """A port free on this node now (rank 0's: the tensor-parallel group's rendezvous)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def stop(self) -> None:
        self._server.stop()


@ray.remote(num_cpus=0)
class SchedulerActor:
    """The central scheduler: hosts the Serving gRPC server and drives the workers."""

    def __init__(
        self, replicas, model, cache, scheduler, server, model_name: str, log_level: str = "INFO"
    ) -> None:
        from scheduler.serving import ServingServer

        logging.basicConfig(level=log_level)
        self._server = ServingServer(replicas, model, cache, scheduler, server, model_name)

    def address(self) -> str:
        return self._server.address

    def pid(self) -> int:
        return os.getpid()

    def step_records(self) -> list[dict]:
        return self._server.step_records()

    def stop(self) -> None:
        self._server.stop()
