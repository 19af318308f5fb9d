"""CUDA graphs of the model's forward pass one row a token, one per row count of a ladder: a
decode step's rows are its sequences; a step with short prefill chunks gives each of their
tokens a row of its own at its position, attending to its prefix (model_runner decides which
steps fit).

A decode step launches some ten kernels a layer (hundreds for a 32-layer model), and launching
them from Python costs more than running them at small batches. The graphs are captured once,
after the KV cache is allocated, for sizes 1, 2, 4, 8, 16, ... 256, 272, ... up to max_rows
(capture_sizes; the runner asks for its max_num_seqs and some rows for prompt tokens); a step
of b rows replays the smallest size >= b. Its padding rows write no KV (slot -1) and attend to
nothing (seq_len 0), and their outputs are dropped. A graph runs the model and its LM head: it
leaves this rank's logits and every row's greedy token (the argmax over the whole vocabulary,
the same on every rank), so a step whose rows all decode greedily needs nothing after it. The
tensor-parallel collectives are inside the graphs: every rank captures the same sizes in the
same order.

Static buffers (device), rows [0, size) read by the graph of that size:

    inputs     GraphInputs: one int64 buffer holding, as views,
      ids          [4, max_size] int64      input_ids | sources | positions | slot_mapping
      seq_lens     [max_size] int32
      block_tables [max_size, max_blocks] int32
    sampled    [max_size] int64         the previous step's sampled tokens; the graph then
                                        writes its greedy tokens over them
    logits     [max_size, vocab_shard]  this rank's logits of the rows (the model's dtype)

Row i's input token is sampled[sources[i]] when sources[i] >= 0 (a token still on its way to
the host; the graph gathers it), else input_ids[i]. The inputs are filled from a pinned host
copy of the same layout in one copy a step (its prefix up to the step's last block-table row).
Two host copies alternate: a step's is rewritten two steps later, after the step between has
finished, so its copy has completed. All graphs share one memory pool, captured largest first.
"""

import numpy as np
import torch

from worker.layers.attention import AttentionMetadata


def capture_sizes(max_rows: int) -> list[int]:
    """1, 2, 4, every multiple of 8 up to 256, then of 16 (as vLLM's ladder: at most 15 padded
    rows where a step's rows cost least), up to max_rows (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_rows]
    sizes += range(8, min(max_rows, 256), 8)
    sizes += range(256, max_rows, 16)
    return [*sizes, max_rows]


def size_for(sizes: list[int], n: int) -> int | None:
    """The smallest of a ladder's captured sizes (ascending) that holds n rows or tokens (None:
    n is larger than any)."""
    return next((s for s in sizes if s >= n), None)


class DecodeGraphs:
    def __init__(
        self, model: torch.nn.Module, max_rows: int, max_blocks: int, device: torch.device
    ) -> None:
        self.model = model
        self.sizes = capture_sizes(max_rows)
        self.max_size = self.sizes[-1]
        size = self.max_size
        self.inputs = GraphInputs(size, max_blocks, device)
        self._staging = [GraphInputs(size, max_blocks, torch.device("cpu")) for _ in range(2)]
        self._num_runs = 0
        self.ids = self.inputs.ids
        self.seq_lens = self.inputs.seq_lens
        self.block_tables = self.inputs.block_tables
        self.sampled = torch.zeros(size, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        lm_head = model.lm_head
        self.logits = torch.zeros((size, lm_head.shard), dtype=lm_head.weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _forward(self, size: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.ids[3, :size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1],  # a bound; the decode kernel reads none
        )
        sources = self.ids[1, :size]
        gathered = self.sampled[sources.clamp(min=0)]
        input_ids = torch.where(sources >= 0, gathered, self.ids[0, :size])
        hidden = self.model(input_ids, self.ids[2, :size], meta)
        local = self.model.lm_head.local_logits(hidden)  # [size, vocab_shard]
        self.logits[:size].copy_(local)
        self.sampled[:size].copy_(self.model.lm_head.greedy(local))

    @torch.inference_mode()
    def capture(self) -> None:
        # Rows attend to one token in block 0 and write nowhere: real work, no KV changed.
        self.ids.zero_()
        self.ids[1].fill_(-1)
        self.ids[3].fill_(-1)
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # outside the capture: compiles kernels, allocates workspaces
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def size_for(self, num_rows: int) -> int | None:
        """The captured size a step of num_rows rows replays (None: larger than any)."""
        return size_for(self.sizes, num_rows)

    def run(
        self,
        size: int,
        input_ids: np.ndarray,
        sources: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replays the graph of `size` on the first n = len(input_ids) rows; returns their
        logits on this rank [n, vocab_shard] and greedy tokens [n] (views of the static
        buffers: the next replay overwrites them). block_tables [n, width <= max_blocks]."""
        n, width = len(input_ids), block_tables.shape[1]
        staging = self._staging[self._num_runs % 2]
        self._num_runs += 1
        ids = staging.host_ids
        ids[0, :n], ids[1, :n], ids[2, :n], ids[3, :n] = input_ids, sources, positions, slot_mapping
        ids[0, n:size], ids[1, n:size], ids[2, n:size], ids[3, n:size] = 0, -1, 0, -1
        staging.host_seq_lens[:n] = positions + 1
        staging.host_seq_lens[n:size] = 0
        staging.host_tables[:n, :width] = block_tables
        self.inputs.copy_from(staging, num_table_rows=n)
        self.graphs[size].replay()
        return self.logits[:n], self.sampled[:n]


class GraphInputs:
    """The graphs' integer inputs in one int64 buffer on a device (pinned on the host when
    CUDA is there), so that a step moves them with one copy. Views (max_size rows):

        ids           [4, max_size] int64          buffer[: 4 * max_size]
        seq_lens      [max_size] int32             then, as int32: max_size entries (padded to
                                                   16 bytes, where the tables start)
        block_tables  [max_size, max_blocks] int32 then max_size * max_blocks entries

    On the host, host_ids / host_seq_lens / host_tables are numpy views of the same memory."""

    def __init__(self, max_size: int, max_blocks: int, device: torch.device) -> None:
        self.max_size, self.max_blocks = max_size, max_blocks
        self._tables_at = -(-max_size // 4) * 4  # in int32 entries after the ids
        num_int32 = self._tables_at + max_size * max_blocks
        pin = device.type == "cpu" and torch.cuda.is_available()
        self.buffer = torch.zeros(
            4 * max_size + -(-num_int32 // 2), dtype=torch.int64, device=device, pin_memory=pin
        )
        self.ids = self.buffer[: 4 * max_size].view(4, max_size)
        int32 = self.buffer[4 * max_size :].view(torch.int32)
        self.seq_lens = int32[:max_size]
        self.block_tables = int32[self._tables_at : num_int32].view(max_size, max_blocks)
        if device.type == "cpu":
            self.host_ids = self.ids.numpy()
            self.host_seq_lens = self.seq_lens.numpy()
            self.host_tables = self.block_tables.numpy()

    def copy_from(self, host: "GraphInputs", num_table_rows: int) -> None:
        """One copy of host's ids, seq_lens and first num_table_rows block-table rows into
        these (asynchronous from pinned memory; the other rows keep what they held)."""
        num_int32 = self._tables_at + num_table_rows * self.max_blocks
        end = 4 * self.max_size + -(-num_int32 // 2)
        self.buffer[:end].copy_(host.buffer[:end], non_blocking=True)
