"""The router: picks the replica for a new request from what it routed before, without reading
any replica's page table.

Each replica's engine (its scheduler, page table and workers) is moving into a process of its own,
out of reach of the router, which stays in the engine core. So the router keeps its own estimate
of each replica's prefix cache, as SGLang's cache-aware router does: the chained block hashes
(block_hash.py) of the full blocks of every request it sent there, in LRU order, at most as many
as the replica has KV blocks. It is an estimate: the replica may have evicted a block the map
still holds, or cache one the map never saw (a request's output tokens).

A new request goes to the replica whose map holds the longest prefix of its chain (the fewest
tokens left to prefill, as far as the router knows); ties go to the replica with the fewest
unfinished requests, then to the lowest id. The cache counts only among the replicas loaded at
most BALANCE_SLACK requests (or half) above the least loaded: without that bound every request
sharing a system prompt would follow the first one to a single replica. Past it, the prefix is
recorded on a second replica too, and the two share the load from then on.

Replicas join (scale-up, a recovered replica) and leave (a draining or failed replica takes no
new request) while it routes; with none left, route() says so and the fleet holds the request.
"""

import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler.core.block_hash import block_hashes
from scheduler.core.request import Request

# A replica's cached prefix counts while its load is at most this many requests above the least
# loaded replica's, or half of that load when more.
BALANCE_SLACK = 32


@dataclass
class _Replica:
    """What the router knows of one replica."""

    capacity: int  # its number of KV blocks: the most hashes `blocks` holds
    load: Callable[[], int]  # its number of unfinished requests
    # The hashes of the blocks routed to it, least recently routed first (the values are unused).
    # A chain is recorded from its last block to its first, so a chain's first blocks outlive its
    # later ones: eviction shortens chains from the end, and a prefix walk still finds the rest.
    blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)

    def num_cached(self, chain: list[bytes]) -> int:
        """How many blocks of the chain its map holds, from the first to the first missing."""
        return sum(1 for _ in itertools.takewhile(self.blocks.__contains__, chain))

    def record(self, chain: list[bytes]) -> None:
        """The chain was routed here: its blocks become the most recently routed."""
        blocks = self.blocks
        for block_hash in reversed(chain):
            blocks[block_hash] = None
            blocks.move_to_end(block_hash)
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)


class Router:
    """Routes requests whose block hashes are of block_size tokens over the replicas added."""

    def __init__(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self._replicas: dict[int, _Replica] = {}
        self._lock = threading.Lock()  # guards _replicas and their maps

    def add(self, replica_id: int, block_size: int, capacity: int, load: Callable[[], int]) -> None:
        """Routes new requests to this replica too. capacity: its number of KV blocks (0 when
        it caches no prefix); load(): its number of unfinished requests (called while routing,
        so it must be cheap and must not block)."""
        if block_size != self.block_size:  # the requests' block hashes are of one block size
            raise ValueError(
                f"replica {replica_id}'s block size {block_size} is not the router's "
                f"{self.block_size}: replicas must share one block size"
            )
        if capacity < 0:
            raise ValueError(f"replica {replica_id}'s capacity must be >= 0, got {capacity}")
        with self._lock:
            if replica_id in self._replicas:
                raise ValueError(f"replica {replica_id} is already routed to")
            self._replicas[replica_id] = _Replica(capacity, load)

    def remove(self, replica_id: int) -> None:
        """Routes no new request to this replica (it drains, or failed); forgets its map."""
        with self._lock:
            if self._replicas.pop(replica_id, None) is None:
                raise ValueError(f"replica {replica_id} is not routed to")

    def routes(self, replica_id: int) -> bool:
        """Whether new requests may go to this replica."""
        return replica_id in self._replicas

    def cached_tokens(self, request: Request) -> dict[int, int]:
        """Per replica id, how many of the request's tokens the router estimates its prefix
        cache holds (from the requests routed there; the page table's truth may differ).
        Never all of them: the last token is always computed, as in the page table."""
        with self._lock:
            return self._cached_tokens(request, self._chain(request))

    def route(self, request: Request) -> int | None:
        """The id of the replica for a new request: longest cached prefix among those within
        the balance bound, then least loaded, then lowest id; None when no replica takes
        requests. Records the request's blocks as cached there."""
        with self._lock:
            if not self._replicas:
                return None
            chain = self._chain(request)
            cached = self._cached_tokens(request, chain)
            loads = {i: replica.load() for i, replica in self._replicas.items()}
            least = min(loads.values())
            bound = least + max(BALANCE_SLACK, least // 2)
            within = [i for i in cached if loads[i] <= bound]  # the least loaded among them
            replica_id = max(within, key=lambda i: (cached[i], -loads[i], -i))
            self._replicas[replica_id].record(chain)
            return replica_id

    def _chain(self, request: Request) -> list[bytes]:
        """The hashes of the request's full blocks (the request's own list: computed once, and
        reused by the page table); none when no replica caches (under _lock)."""
        if not any(replica.capacity for replica in self._replicas.values()):
            return []
        return block_hashes(request, request.num_tokens // self.block_size, self.block_size)

    def _cached_tokens(self, request: Request, chain: list[bytes]) -> dict[int, int]:
        lookup = chain[: (request.num_tokens - 1) // self.block_size]  # the last one is computed
        return {
            i: replica.num_cached(lookup) * self.block_size for i, replica in self._replicas.items()
        }
