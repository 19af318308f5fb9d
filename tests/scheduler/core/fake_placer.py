"""A Placer of fake ranks: each replica one FakeRank on a gRPC server of this process, which a
test can kill (its server stops, failing the Execute stream) and whose restarts it can gate."""

import contextlib
import threading

from protos import serving_pb2
from scheduler.core.replica import ReplicaSpec
from tests.scheduler.fake_worker import TIMEOUT, FakeRank, serving


class FakePlacer:
    def __init__(self, num_blocks: int = 64, block_size: int = 8, graphs: bool = False) -> None:
        """graphs: the ranks say their steps of decodes alone replayed a CUDA graph, the
        others the graphs in pieces."""
        self.num_blocks, self.block_size, self.graphs = num_blocks, block_size, graphs
        self.ranks: dict[int, FakeRank] = {}
        self.num_placed = 0
        self.failures_to_come = 0  # place() raises this many times first
        self.may_place = threading.Event()  # place() waits for it
        self.may_place.set()
        self._servers: dict[int, contextlib.ExitStack] = {}
        self._lock = threading.Lock()

    def place(self, replica_id: int) -> ReplicaSpec:
        assert self.may_place.wait(TIMEOUT)
        with self._lock:
            if self.failures_to_come:
                self.failures_to_come -= 1
                raise RuntimeError(f"replica {replica_id}: no room (a test's refusal)")
            rank = FakeRank(num_blocks=self.num_blocks, block_size=self.block_size)
            rank.graphs = self.graphs
            stack = contextlib.ExitStack()
            address = stack.enter_context(serving(rank))
            self.ranks[replica_id], self._servers[replica_id] = rank, stack
            self.num_placed += 1
        return ReplicaSpec((address,), "fake-model")

    def release(self, replica_id: int, failed: bool = False) -> None:
        """Stops the rank's server; failed: as if its process were killed (a held step too)."""
        with self._lock:
            stack = self._servers.pop(replica_id, None)
        if stack is not None:
            stack.close()
        if failed:
            self.ranks[replica_id].release.set()

    def kill(self, replica_id: int) -> None:
        """The replica's worker dies: its server stops (its streams break), a held step too."""
        self.release(replica_id, failed=True)

    def nodes(self) -> list[serving_pb2.NodeInfo]:
        return []
