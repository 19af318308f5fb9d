"""Every block table this rank holds, in one host array, so that a step's table is one gather.

    table [num_rows, max_blocks] int32      row r: the block ids of the request that holds r,
                                            its first lengths[r] entries valid, the rest stale

A request takes a row when it arrives and gives it back when it is dropped; the plan's new
block ids are written into its row as they come (never the whole table again). A step's
[num_seqs, width] block table is table[rows, :width].
"""

import numpy as np


class BlockTables:
    def __init__(self, max_blocks: int, num_rows: int = 64) -> None:
        self.max_blocks = max_blocks
        self.table = np.zeros((num_rows, max_blocks), dtype=np.int32)
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
