"""The router: every serving replica's page table seen at once (the global page table), to route
new requests.

A new request goes to the replica that caches its longest prefix (the fewest tokens left to
prefill); ties go to the replica with the fewest unfinished requests, then to the lowest id. The
cache counts only among the replicas loaded at most BALANCE_SLACK requests (or half the least
loaded's load, when more) above the least loaded: without that bound every request sharing a
system prompt would follow the first one to the replica that cached it. Past it, a request goes
by load, the prefix gets cached on a second replica too, and the two share the load from then.
Replicas join (scale-up, a recovered replica) and leave (a draining or failed replica takes no
new request) while it routes; with none left, route() says so and the fleet holds the request.
"""

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler

# A replica's cached prefix counts while its load is at most this many requests above the least
# loaded replica's, or half of that load when more.
BALANCE_SLACK = 32


class Router:
    """schedulers[i] is replica i's (its page_table is the replica's pool); locks[i], if given,
    is held while reading replica i's state (its engine thread changes it). Replicas added later
    bring their own id."""

    def __init__(
        self,
        schedulers: Sequence[Scheduler],
        locks: Sequence[AbstractContextManager] | None = None,
    ) -> None:
        if not schedulers:
            raise ValueError("a router needs at least one replica")
        self._members: dict[int, tuple[Scheduler, AbstractContextManager]] = {}
        self._membership = threading.Lock()
        locks = list(locks) if locks is not None else [nullcontext()] * len(schedulers)
        for replica_id, (scheduler, lock) in enumerate(zip(schedulers, locks, strict=True)):
            self.add(replica_id, scheduler, lock)

    def add(
        self, replica_id: int, scheduler: Scheduler, lock: AbstractContextManager | None = None
    ) -> None:
        """Routes new requests to this replica too."""
        with self._membership:
            if replica_id in self._members:
                raise ValueError(f"replica {replica_id} is already routed to")
            block_sizes = {s.page_table.block_size for s, _ in self._members.values()}
            block_sizes.add(scheduler.page_table.block_size)
            if len(block_sizes) > 1:  # a request's block hashes are computed for one block size
                raise ValueError(f"replicas must share one block size, got {sorted(block_sizes)}")
            self._members = {**self._members, replica_id: (scheduler, lock or nullcontext())}

    def remove(self, replica_id: int) -> None:
        """Routes no new request to this replica (it drains, or failed)."""
        with self._membership:
            if replica_id not in self._members:
                raise ValueError(f"replica {replica_id} is not routed to")
            self._members = {i: m for i, m in self._members.items() if i != replica_id}

    def routes(self, replica_id: int) -> bool:
        """Whether new requests may go to this replica."""
        return replica_id in self._members

    def cached_tokens(self, request: Request) -> dict[int, int]:
        """Per replica id, how many of the request's tokens its prefix cache holds."""
        return self._cached_tokens(self._members, request)

    def route(self, request: Request) -> int | None:
        """The id of the replica for a new request: longest cached prefix among those within
        the balance bound, then least loaded, then lowest id; None when no replica takes
        requests."""
        members = self._members  # replaced, never changed: a consistent snapshot
        if not members:
            return None
        loads = {}
        for replica_id, (scheduler, lock) in members.items():
            with lock:
                loads[replica_id] = len(scheduler.requests)
        least = min(loads.values())
        bound = least + max(BALANCE_SLACK, least // 2)
        within = {i: m for i, m in members.items() if loads[i] <= bound}  # the least loaded too
        cached = self._cached_tokens(within, request)
        return max(within, key=lambda i: (cached[i], -loads[i], -i))

    @staticmethod
    def _cached_tokens(
        members: dict[int, tuple[Scheduler, AbstractContextManager]], request: Request
    ) -> dict[int, int]:
        counts = {}
        for replica_id, (scheduler, lock) in members.items():
            pt = scheduler.page_table
            with lock:
                counts[replica_id] = len(pt.cached_prefix(request)) * pt.block_size
        return counts
