"""The global page table: every replica's page table seen at once, to route new requests.

A new request goes to the replica that caches its longest prefix (the fewest tokens left to
prefill); ties go to the replica with the fewest unfinished requests, then to the first.
"""

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

from scheduler.request import Request
from scheduler.scheduler import Scheduler


class GlobalPageTable:
    """schedulers[i] is replica i's (its page_table is the replica's pool); locks[i], if given,
    is held while reading replica i's state (its engine thread changes it)."""

    def __init__(
        self,
        schedulers: Sequence[Scheduler],
        locks: Sequence[AbstractContextManager] | None = None,
    ) -> None:
        if not schedulers:
            raise ValueError("a global page table needs at least one replica")
        block_sizes = {s.page_table.block_size for s in schedulers}
        if len(block_sizes) > 1:  # a request's block hashes are computed for one block size
            raise ValueError(f"replicas must share one block size, got {sorted(block_sizes)}")
        self.schedulers = list(schedulers)
        self._locks = list(locks) if locks is not None else [nullcontext()] * len(schedulers)

    def cached_tokens(self, request: Request) -> list[int]:
        """Per replica, how many of the request's tokens its prefix cache holds."""
        counts = []
        for scheduler, lock in zip(self.schedulers, self._locks, strict=True):
            pt = scheduler.page_table
            with lock:
                counts.append(len(pt.cached_prefix(request)) * pt.block_size)
        return counts

    def route(self, request: Request) -> int:
        """The replica for a new request: longest cached prefix, then least loaded."""
        loads = []
        for scheduler, lock in zip(self.schedulers, self._locks, strict=True):
            with lock:
                loads.append(len(scheduler.requests))
        cached = self.cached_tokens(request)
        return max(range(len(self.schedulers)), key=lambda i: (cached[i], -loads[i], -i))
