"""Every block table this rank holds, in one host array, so that a step's table is one gather.

    table [num_rows, columns] int32         row r: the block ids of the request that holds r,
                                            its first lengths[r] entries valid, the rest stale;
                                            columns: max_blocks rounded up to a multiple of 16

A request takes a row when it arrives and gives it back when it is dropped; the plan's new
block ids are written into its row as they come (never the whole table again). A step's
[num_seqs, width] block table is table[rows, :width]; step_width() gives an eager step's.
"""

import numpy as np

# Triton specialises an integer argument on whether it is divisible by 16 (and equal to 1): a
# step's table width (a kernel's max_blocks and row stride) that varies in that respect would
# compile another variant of the attention kernels mid-serving. Eager steps' widths are
# multiples of this, never 1.
WIDTH_MULTIPLE = 16


class BlockTables:
    def __init__(self, max_blocks: int, num_rows: int = 64) -> None:
        self.max_blocks = max_blocks
        columns = -(-max_blocks // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
        self.table = np.zeros((num_rows, columns), dtype=np.int32)
        self.lengths = np.zeros(num_rows, dtype=np.int64)
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        """A row for a new request, holding block_ids; returns the row."""
        if not self._free_rows:  # more requests held than rows: double the rows
            old = len(self.table)
            self.table = np.concatenate([self.table, np.zeros_like(self.table)])
            self.lengths = np.concatenate([self.lengths, np.zeros_like(self.lengths)])
            self._free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self._free_rows.pop()
        self.lengths[row] = 0
        self.append(row, block_ids)
        return row

    def release(self, row: int) -> None:
        self._free_rows.append(row)

    def append(self, row: int, block_ids: list[int]) -> None:
        start = int(self.lengths[row])
        end = start + len(block_ids)
        if end > self.max_blocks:
            raise RuntimeError(
                f"a request's block table would hold {end} blocks; at most {self.max_blocks} "
                "(max_model_len / block_size) fit"
            )
        self.table[row, start:end] = block_ids
        self.lengths[row] = end

    def replace(self, row: int, block_ids: list[int]) -> None:
        self.lengths[row] = 0
        self.append(row, block_ids)

    def num_blocks(self, row: int) -> int:
        return int(self.lengths[row])

    def step_width(self, max_seq_len: int, block_size: int) -> int:
        """An eager step's table width: the blocks its longest sequence holds, rounded up to a
        multiple of WIDTH_MULTIPLE (the entries past a row's blocks are never read)."""
        needed = -(-max_seq_len // block_size)
        return -(-needed // WIDTH_MULTIPLE) * WIDTH_MULTIPLE
