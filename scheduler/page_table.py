"""The page table of one replica's paged KV cache.

    block ids      0 1 2 3 4 5 6 7 ...  num_blocks - 1      (the same ids on every rank)
    free queue     [5, 7, 2, ...]       blocks no table references, oldest-freed first
    ref_counts     [1, 2, 1, 0, ...]    number of block tables holding each block
    block_tables   {"req-a": [0, 1, 4], "req-b": [1, 3]}
    slot of token p of a request = table[p // block_size] * block_size + p % block_size

Invariants (tests/scheduler checks them after every operation): a block is either free or
referenced; its ref count equals the number of tables holding it; free + used == total.
"""

from collections import deque


class PageTableManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_queue: deque[int] = deque(range(num_blocks))
        self.block_tables: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks to add so the request's table covers num_tokens slots."""
        have = len(self.block_tables.get(request_id, ()))
        return max(self.blocks_for(num_tokens) - have, 0)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.num_new_blocks(request_id, num_tokens) <= self.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grows the request's table to cover num_tokens slots (appending slots as tokens come).

        Returns the appended block ids, or None (and changes nothing) if too few are free.
        """
        needed = self.num_new_blocks(request_id, num_tokens)
        if needed > self.num_free_blocks:
            return None
        table = self.block_tables.setdefault(request_id, [])
        new_blocks = [self.free_queue.popleft() for _ in range(needed)]
        for block in new_blocks:
            self.ref_counts[block] += 1
        table.extend(new_blocks)
        return new_blocks

    def free(self, request_id: str) -> None:
        """Drops the request's table; blocks nobody else holds return to the free queue.

        The tail block goes back first, so the blocks freed last (the prompt's) stay longest.
        """
        for block in reversed(self.block_tables.pop(request_id, [])):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_queue.append(block)

    def check_invariants(self) -> None:
        """Raises AssertionError if the pool is inconsistent (for tests and debugging)."""
        counts = [0] * self.num_blocks
        for table in self.block_tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "ref counts differ from the block tables"
        free = set(self.free_queue)
        assert len(free) == len(self.free_queue), "a block is queued twice"
        for block in range(self.num_blocks):
            assert (block in free) != (counts[block] > 0), f"block {block} free and used"
