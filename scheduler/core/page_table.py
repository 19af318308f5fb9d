"""The page table of one replica's paged KV cache.

    block ids      0 1 2 3 4 5 6 7 ...  num_blocks - 1      (the same ids on every rank)
    block_tables   {"req-a": [0, 1, 4], "req-b": [0, 1, 3]}  req-b shares a's first two blocks
    host_tables    {"req-c": [2, 0]}                          swapped out: blocks in host memory
    slot of token p of a request = table[p // block_size] * block_size + p % block_size

Blocks are shared by reference count (BlockPool): a prefix-cache hit or a fork adds a holder,
nothing is copied. A request writes only its own uncomputed slots, so only the block it is about
to write can need a private copy: one another table holds, or one in the prefix cache (a cached
block never changes: any request may hit it).

Block operations accumulate until take_block_ops(), once per step; the worker applies them in the
order swap out, swap in, copy, before the step's forward pass. That order is right because within
one step the scheduler first takes blocks away (preempt: free or swap out), then hands them out
(allocate, swap in); fork, finish and abort fall between steps. And a copy's source stays held,
a freed host block unused, until the step's operations are taken: no later operation in the step
can overwrite what an earlier one reads.

Only blocks full of tokens the scheduler knows enter the prefix cache. With async scheduling a
step may compute a token still being sampled by the step before (Request.num_pending_tokens):
its block is offered by a later allocate(), once the token is learned. So a cached block's every
slot is written, by a plan sent no later than any plan that can hit it, with the tokens its hash
names; and a block a request may still write (a pending token's, or one an in-flight step writes
after the request ended) is never in the prefix cache: the request held it alone, unhashed, when
that write was planned, and whoever gets it next is planned after.

Most steps of a running request are decodes whose one token goes into the table's last block,
which needs nothing of allocate(). Each table that may do so has a decode window (lo, hi, full):
an allocate of tokens [start, end) with lo <= start, end <= hi and min(end, the request's known
tokens) <= full returns at once, changing nothing: the tokens go into the last block, which the
table alone holds and the prefix cache does not, and no block of known tokens is due to be
offered. The window is set where a table is grown (allocate's general path, swap_in) and
dropped wherever else the table or its last block's holders change (fork, free, swap_out); the
scheduler reads it to plan such a decode without a call per request.

Invariants (check_invariants; tests/scheduler checks them after every operation): a block is
free or held; its ref count equals the number of tables holding it; free + held == total; the
same for host blocks, each held by at most one table; a decode window lies in its table's last
block, which that table alone holds and the prefix cache does not, and its known tokens end
before the first block not yet offered to the prefix cache is full.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.core.block_hash import hash_block
from scheduler.core.block_pool import BlockPool
from scheduler.core.request import Request

BlockPairs = list[tuple[int, int]]  # (src, dst)


@dataclass
class BlockOps:
    """One step's block operations, in the order the worker applies them."""

    swap_out: BlockPairs = field(default_factory=list)  # device -> host
    swap_in: BlockPairs = field(default_factory=list)  # host -> device
    copies: BlockPairs = field(default_factory=list)  # device -> device (copy-on-write)
    # Requests whose table changed other than at its end (a copy-on-write, a swap-in): the
    # workers need the whole table again.
    rewritten: set[str] = field(default_factory=set)


class PageTableManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1 or block_size < 1 or num_host_blocks < 0:
            raise ValueError(
                f"num_blocks={num_blocks} and block_size={block_size} must be >= 1, "
                f"num_host_blocks={num_host_blocks} >= 0"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.block_tables: dict[str, list[int]] = {}
        # Leading full blocks of each table already offered to the prefix cache.
        self._num_offered: dict[str, int] = {}
        self.num_host_blocks = num_host_blocks
        self.host_tables: dict[str, list[int]] = {}
        self._free_host = list(range(num_host_blocks))
        # Request id -> its decode window (lo, hi, full): see the module doc.
        self.decode_windows: dict[str, tuple[int, int, int]] = {}
        self._ops = BlockOps()
        self._copy_sources: list[int] = []  # held until the copies reading them are planned
        self._host_freed: list[int] = []  # reusable once the swaps writing them are planned

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, cached ones included (they are evicted on demand)."""
        return self.pool.num_free

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._free_host)

    @property
    def usage(self) -> float:
        """The fraction of blocks held by requests."""
        return 1.0 - self.pool.num_free / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- the prefix cache -------------------------------------------------------------------

    def cached_prefix(self, request: Request) -> list[int]:
        """The blocks caching the longest prefix of the request's tokens, in full blocks.

        Never all of its tokens: the last one is left to compute, so that a token is sampled.
        Looks only; allocate(request, n, cached_blocks=...) takes them.
        """
        if not self.enable_prefix_caching:
            return []
        blocks = []
        for i in range((request.num_tokens - 1) // self.block_size):
            block = self.pool.cached.get(self._block_hash(request, i))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _block_hash(self, request: Request, i: int) -> bytes:
        """The chained hash of the request's block i, extending request.block_hashes to it."""
        hashes, bs = request.block_hashes, self.block_size
        while len(hashes) <= i:
            j = len(hashes)
            assert (j + 1) * bs <= request.num_tokens, "hashing tokens the scheduler lacks"
            hashes.append(
                hash_block(
                    hashes[j - 1] if j else None,
                    request.token_ids(j * bs, (j + 1) * bs),
                    "" if j else request.cache_salt,
                )
            )
        return hashes[i]

    def _offer_full_blocks(self, request: Request, table: list[int], num_known: int) -> None:
        """Enters the table's blocks that its first num_known tokens fill (known ones: never a
        pending token), and were not offered yet, in the prefix cache."""
        rid = request.request_id
        offered = self._num_offered.get(rid, 0)
        full = num_known // self.block_size
        for i in range(offered, full):
            self.pool.cache(table[i], self._block_hash(request, i))
        if full > offered:
            self._num_offered[rid] = full

    # -- growing, sharing and dropping tables ------------------------------------------------

    def allocate(
        self, request: Request, num_new_tokens: int, cached_blocks: Sequence[int] = ()
    ) -> bool:
        """Makes room for the request's next num_new_tokens tokens, after its computed ones and
        after cached_blocks (a prefix-cache hit, for a request without a table yet).

        A block those tokens would write into is copied first if another table or the prefix
        cache holds it (copy-on-write); blocks they fill enter the prefix cache. Returns False,
        changing nothing, if too few blocks are free.
        """
        rid, bs, pool = request.request_id, self.block_size, self.pool
        window = self.decode_windows.get(rid)
        if window is not None and not cached_blocks:
            start = request.num_computed_tokens
            end = start + num_new_tokens
            lo, hi, full = window
            if lo <= start and end <= hi and min(end, request.num_tokens) <= full:
                return True
        table = self.block_tables.get(rid)
        if table is None:
            table = []
        assert not cached_blocks or (not table and request.num_computed_tokens == 0)
        start = request.num_computed_tokens + len(cached_blocks) * bs
        end = start + num_new_tokens
        num_blocks, num_held = -(-end // bs), len(table)
        to_copy = []  # table blocks the new tokens write into that are held elsewhere too
        if start < num_held * bs:  # the first new token goes into an existing block
            ref_counts, block_hashes = pool.ref_counts, pool.block_hashes
            for i in range(start // bs, min(num_blocks, num_held)):
                if ref_counts[table[i]] > 1 or block_hashes[table[i]] is not None:
                    to_copy.append(i)
        num_fresh = num_blocks - num_held - len(cached_blocks)
        if num_fresh > 0 or to_copy or cached_blocks:  # else (most decodes) the slots are there
            num_fresh = max(num_fresh, 0)
            num_revived = 0
            if cached_blocks:
                num_revived = sum(1 for block in cached_blocks if pool.ref_counts[block] == 0)
            if num_fresh + len(to_copy) + num_revived > pool.num_free:
                return False
            self.block_tables[rid] = table
            if cached_blocks:
                pool.share(cached_blocks)  # before take(): a hit must not be evicted for us
                table.extend(cached_blocks)
                self._num_offered[rid] = len(cached_blocks)
            if to_copy:
                self._ops.rewritten.add(rid)
            for i in to_copy:
                (copy,) = pool.take(1)
                self._ops.copies.append((table[i], copy))
                if pool.ref_counts[table[i]] > 1:
                    pool.release([table[i]])  # the others keep holding it
                else:  # a cached block only we held: free it once the copy is planned
                    self._copy_sources.append(table[i])
                table[i] = copy
            table.extend(pool.take(num_fresh))
        # A pending token is not hashed (see the module doc).
        num_known = len(request.prompt_token_ids) + len(request.output_token_ids)
        if end < num_known:
            num_known = end
        if self.enable_prefix_caching and num_known // bs > self._num_offered.get(rid, 0):
            self._offer_full_blocks(request, table, num_known)
        self._open_decode_window(rid, table)
        return True

    def _open_decode_window(self, rid: str, table: list[int]) -> None:
        """Sets the table's decode window, or drops it when its last block is shared or cached.

        Tokens in the last block need no copy while no other holder or cache entry appears for
        it: only fork() adds one (and drops the window); a table's own block is cached only by
        its own allocate or swap_in (which set the window again). They need no offer while the
        known ones end before the first block not offered yet is full (offers are made by the
        same two, so the count the window is made from holds while it does)."""
        pool = self.pool
        last = table[-1] if table else None
        if last is None or pool.ref_counts[last] != 1 or pool.block_hashes[last] is not None:
            self.decode_windows.pop(rid, None)
            return
        bs = self.block_size
        held = len(table) * bs
        full = held
        if self.enable_prefix_caching:
            full = (self._num_offered.get(rid, 0) + 1) * bs - 1
        self.decode_windows[rid] = (held - bs, held, full)

    def fork(self, parent: Request, child: Request) -> None:
        """The child shares the blocks of the parent's first child.num_tokens tokens (the prompt
        both have computed) by reference count; whoever writes into a shared block copies it."""
        num_tokens = child.num_tokens
        table = self.block_tables[parent.request_id][: self.blocks_for(num_tokens)]
        assert len(table) == self.blocks_for(num_tokens), "the parent has not computed the prompt"
        self.pool.share(table)
        self.decode_windows.pop(parent.request_id, None)  # its blocks are shared now
        self.block_tables[child.request_id] = list(table)
        num_full = num_tokens // self.block_size
        self._num_offered[child.request_id] = min(
            self._num_offered.get(parent.request_id, 0), num_full
        )
        child.block_hashes = parent.block_hashes[:num_full]

    def free(self, request_id: str) -> None:
        """Drops the request's tables (device and host); freeing twice is harmless.

        Its host blocks are reusable from the next step: a swap planned in this one may still
        write them."""
        table = self.block_tables.pop(request_id, None)
        if table is not None:
            self.pool.release(reversed(table))
        self._num_offered.pop(request_id, None)
        self.decode_windows.pop(request_id, None)
        self._host_freed.extend(self.host_tables.pop(request_id, ()))

    # -- swapping ----------------------------------------------------------------------------

    def swap_out(self, request: Request) -> bool:
        """Moves the request's blocks to host memory (the device blocks go free; cached ones stay
        findable until evicted). Returns False, changing nothing, if host memory is short."""
        rid = request.request_id
        table = self.block_tables[rid]
        if len(table) > len(self._free_host):
            return False
        host = [self._free_host.pop() for _ in table]
        self._ops.swap_out.extend(zip(table, host, strict=True))
        self.pool.release(reversed(table))
        del self.block_tables[rid]
        self._num_offered.pop(rid, None)
        self.decode_windows.pop(rid, None)
        self.host_tables[rid] = host
        return True

    def swap_in(self, request: Request, num_new_tokens: int) -> bool:
        """Brings a swapped-out request's blocks back to fresh device blocks, with room for its
        next num_new_tokens tokens. Returns False, changing nothing, if too few are free."""
        rid = request.request_id
        host = self.host_tables[rid]
        end = request.num_computed_tokens + num_new_tokens
        num_blocks = max(self.blocks_for(end), len(host))
        if num_blocks > self.pool.num_free:
            return False
        table = self.pool.take(num_blocks)
        self._ops.swap_in.extend(zip(host, table, strict=False))  # the tail is for new tokens
        self._host_freed.extend(host)  # read by this step's swap-in: reusable from the next
        del self.host_tables[rid]
        self.block_tables[rid] = table
        self._ops.rewritten.add(rid)
        if self.enable_prefix_caching:
            self._offer_full_blocks(request, table, min(end, request.num_tokens))
        self._open_decode_window(rid, table)
        return True

    def is_rewritten(self, request_id: str) -> bool:
        """Whether the request's table changed this step other than at its end (a copy-on-write,
        a swap-in): the workers need all of it again."""
        return request_id in self._ops.rewritten

    def has_block_ops(self) -> bool:
        """Whether this step has block operations for its plan so far."""
        ops = self._ops
        return bool(ops.swap_out or ops.swap_in or ops.copies)

    def take_block_ops(self) -> BlockOps:
        """This step's block operations, for its plan; the next step starts with none."""
        ops, self._ops = self._ops, BlockOps()
        self.pool.release(self._copy_sources)
        self._free_host.extend(self._host_freed)
        self._copy_sources, self._host_freed = [], []
        return ops

    def check_invariants(self) -> None:
        """Raises AssertionError if the pool is inconsistent (for tests and debugging)."""
        holders = [0] * self.num_blocks
        for table in [*self.block_tables.values(), self._copy_sources]:
            for block in table:
                holders[block] += 1
        self.pool.check_invariants(holders)
        assert not self.block_tables.keys() & self.host_tables.keys(), "a table on both sides"
        host = [b for table in self.host_tables.values() for b in table]
        host += self._free_host + self._host_freed
        assert sorted(host) == list(range(self.num_host_blocks)), "host blocks leak or repeat"
        for rid, offered in self._num_offered.items():
            assert offered <= len(self.block_tables[rid]), f"{rid}: offered past its table"
        bs, pool = self.block_size, self.pool
        for rid, (lo, hi, full) in self.decode_windows.items():
            table = self.block_tables[rid]
            last = table[-1]
            assert lo == (len(table) - 1) * bs and hi == lo + bs, f"{rid}: window off its end"
            assert pool.ref_counts[last] == 1, f"{rid}: window on a shared block"
            assert pool.block_hashes[last] is None, f"{rid}: window on a cached block"
            if self.enable_prefix_caching:
                offered = self._num_offered.get(rid, 0)
                assert full == (offered + 1) * bs - 1, f"{rid}: window past an offer"
            else:
                assert full == hi, f"{rid}: window's end differs without caching"
