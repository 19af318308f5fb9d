"""Every request this rank holds as one row of host arrays, so that a step reads and updates
its requests with a few numpy gathers and scatters instead of a Python loop over them.

Row r is the request's block-table row (worker.block_table): the two grow together. Per row:

    tokens        [num_rows, capacity] int32   its token ids known on the host (prompt, then
                                               outputs), the first num_known[r] valid
    num_known     [num_rows] int64             tokens on the host
    num_tokens    [num_rows] int64             num_known + the tokens sampled by launched steps
                                               not yet on the host (0, 1 or 2 of them)
    num_computed  [num_rows] int64             tokens in the KV cache, as the plans count them
    pending_index [num_rows] int64             its row in the newest launched step's sampled
                                               tokens (read only where num_tokens > num_known)
    epoch         [num_rows] int64             bumped each time the row is given to a request:
                                               a step finishing after its request left (and the
                                               row was reused) appends nothing

Invariants: num_computed <= num_tokens and num_known <= num_tokens <= num_known + 2 on every
held row. How each row samples is worker.sampling_rows'.
"""

import numpy as np


class RequestRows:
    def __init__(self, num_rows: int = 64, capacity: int = 256) -> None:
        self.tokens = np.zeros((num_rows, capacity), dtype=np.int32)
        self.num_known = np.zeros(num_rows, dtype=np.int64)
        self.num_tokens = np.zeros(num_rows, dtype=np.int64)
        self.num_computed = np.zeros(num_rows, dtype=np.int64)
        self.pending_index = np.full(num_rows, -1, dtype=np.int64)
        self.epoch = np.zeros(num_rows, dtype=np.int64)

    def _grow(self, num_rows: int, capacity: int) -> None:
        """At least num_rows rows of at least capacity tokens (sizes doubled, contents kept)."""
        old_rows, old_capacity = self.tokens.shape
        if num_rows > old_rows:
            grown = max(num_rows, 2 * old_rows)
            for name in ("num_known", "num_tokens", "num_computed", "epoch"):
                setattr(self, name, _resized(getattr(self, name), grown, 0))
            self.pending_index = _resized(self.pending_index, grown, -1)
        if num_rows > old_rows or capacity > old_capacity:
            width = max(capacity, 2 * old_capacity) if capacity > old_capacity else old_capacity
            tokens = np.zeros((max(num_rows, len(self.num_known)), width), dtype=np.int32)
            tokens[:old_rows, :old_capacity] = self.tokens
            self.tokens = tokens

    def add(self, row: int, token_ids: np.ndarray, num_computed: int) -> None:
        """Gives row to a new request holding token_ids [n] (int32), num_computed in the cache."""
        n = len(token_ids)
        self._grow(row + 1, n + 1)
        self.tokens[row, :n] = token_ids
        self.num_known[row] = self.num_tokens[row] = n
        self.num_computed[row] = num_computed
        self.pending_index[row] = -1
        self.epoch[row] += 1

    def launched(self, rows: np.ndarray, counts: np.ndarray, sample_rows: np.ndarray) -> None:
        """A step computing counts[i] tokens of rows[i] was launched; sample_rows (in the order
        of its sampled tokens) each sample one: pending until appended."""
        self.num_computed[rows] += counts
        self.num_tokens[sample_rows] += 1
        self.pending_index[sample_rows] = np.arange(len(sample_rows))
        self._grow(len(self.num_known), int(self.num_tokens[sample_rows].max(initial=0)))

    def append(self, rows: np.ndarray, epochs: np.ndarray, tokens: np.ndarray) -> None:
        """A step's sampled tokens [n] reached the host: appends token i to rows[i], unless
        the row changed hands since the launch (its epoch differs)."""
        held = self.epoch[rows] == epochs
        if not held.all():
            rows, tokens = rows[held], tokens[held]
        self.tokens[rows, self.num_known[rows]] = tokens
        self.num_known[rows] += 1

    def history(self, row: int) -> np.ndarray:
        """The tokens of row on the host (a view)."""
        return self.tokens[row, : self.num_known[row]]


def _resized(array: np.ndarray, size: int, fill) -> np.ndarray:
    out = np.full(size, fill, dtype=array.dtype)
    out[: len(array)] = array
    return out
