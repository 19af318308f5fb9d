"""The blocks of one replica's KV cache: reference counts, free blocks, and the prefix cache index.

    ref_counts      [1, 2, 0, 0, 1, ...]   number of block tables holding each block
    block_hashes    [h7, None, h2, ...]    a block's hash while it is in the prefix cache
    cached          {h7: 0, h2: 2}         hash -> block id (held or free)
    free plain      [3, ...]               free, holding nothing reusable: handed out first
    free cached     [2, ...]               free but still in the index, least recently freed
                                           first: evicted only when no plain block is left

Invariants (check_invariants): a block is held (ref count > 0), free plain or free cached, exactly
one of the three; a free block is cached iff it has a hash; cached[block_hashes[b]] == b for every
hashed block b.
"""

from collections import OrderedDict, deque
from collections.abc import Iterable


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self._free_plain: deque[int] = deque(range(num_blocks))
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # LRU: first = evicted first

    @property
    def num_free(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def num_free_cached(self) -> int:
        return len(self._free_cached)

    def take(self, count: int) -> list[int]:
        """count fresh blocks, each held once. The caller has checked num_free >= count."""
        blocks = []
        for _ in range(count):
            if self._free_plain:
                block = self._free_plain.popleft()
            else:  # evict the least recently freed cached block
                block, _ = self._free_cached.popitem(last=False)
                del self.cached[self.block_hashes[block]]
                self.block_hashes[block] = None
            self.ref_counts[block] = 1
            blocks.append(block)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more table holds each block: a prefix-cache hit (maybe free) or a fork."""
        for block in blocks:
            if self.ref_counts[block] == 0:  # only a cached block can be found while free
                del self._free_cached[block]
            self.ref_counts[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One table fewer holds each block; a block nobody holds becomes free, a cached one at
        the tail of the eviction order (so release a table tail first: its prefix stays longest).
        """
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is None:
                    self._free_plain.append(block)
                else:
                    self._free_cached[block] = None

    def cache(self, block: int, block_hash: bytes) -> None:
        """Enters a full, held block in the index, unless a block with that hash is already in
        (the first copy of a prefix wins; this one stays plain)."""
        if block_hash not in self.cached and self.block_hashes[block] is None:
            self.cached[block_hash] = block
            self.block_hashes[block] = block_hash

    def check_invariants(self, holders: list[int]) -> None:
        """Raises AssertionError unless holders[b] (tables holding block b) matches the pool."""
        assert holders == self.ref_counts, "ref counts differ from the block tables"
        plain, cached = set(self._free_plain), set(self._free_cached)
        assert len(plain) == len(self._free_plain), "a block is queued twice"
        assert not plain & cached, "a block is free twice"
        for block in range(self.num_blocks):
            free = block in plain or block in cached
            assert free != (holders[block] > 0), f"block {block}: free and held, or neither"
            if free:
                assert (block in cached) == (self.block_hashes[block] is not None)
        hashed = [b for b in range(self.num_blocks) if self.block_hashes[b] is not None]
        assert len(hashed) == len(self.cached), "the index and the block hashes differ"
        for block_hash, block in self.cached.items():
            assert self.block_hashes[block] == block_hash, f"block {block} is indexed wrongly"
