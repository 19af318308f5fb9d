"""CUDA graphs of the model's forward pass over decode steps, one per batch size of a ladder.

A decode step launches some ten kernels a layer (hundreds for a 32-layer model), and launching
them from Python costs more than running them at small batches. The graphs are captured once,
after the KV cache is allocated, for sizes 1, 2, 4, 8, 16, 24, ... up to max_num_seqs; a step of
b decodes replays the smallest size >= b. Its padding rows write no KV (slot -1) and attend to
nothing (seq_len 0), and their outputs are dropped. The tensor-parallel all-reduces are inside
the graphs: every rank captures the same sizes in the same order.

Static buffers (device), rows [0, size) read by the graph of that size:

    ids        [3, max_size] int64      input_ids | positions | slot_mapping
    seq_lens   [max_size] int32
    block_tables [max_size, max_blocks] int32
    outputs[size] [size, hidden_size]   the graph's final hidden states

They are filled from pinned host staging of the same shapes (three copies a step). A step's
staging is rewritten only after the previous step's tokens reached the host, so its copies have
completed. All graphs share one memory pool, captured largest first.
"""

import numpy as np
import torch

from worker.layers.attention import AttentionMetadata


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, then every multiple of 8, up to max_num_seqs (which is always included)."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return [*sizes, max_num_seqs]


class DecodeGraphs:
    def __init__(
        self, model: torch.nn.Module, max_num_seqs: int, max_blocks: int, device: torch.device
    ) -> None:
        self.model = model
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1]
        size, width = self.max_size, max_blocks
        self._host_ids = torch.zeros((3, size), dtype=torch.int64, pin_memory=True)
        self._host_seq_lens = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self._host_tables = torch.zeros((size, width), dtype=torch.int32, pin_memory=True)
        self.host_ids = self._host_ids.numpy()
        self.host_seq_lens = self._host_seq_lens.numpy()
        self.host_tables = self._host_tables.numpy()
        self.ids = torch.zeros((3, size), dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((size, width), dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _forward(self, size: int) -> torch.Tensor:
        meta = AttentionMetadata(
            slot_mapping=self.ids[2, :size],
            block_tables=self.block_tables[:size],
            seq_lens=self.seq_lens[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            max_query_len=1,
            max_seq_len=self.block_tables.shape[1],  # a bound; the decode kernel reads none
        )
        return self.model(self.ids[0, :size], self.ids[1, :size], meta)

    @torch.inference_mode()
    def capture(self) -> None:
        # Rows attend to one token in block 0 and write nowhere: real work, no KV changed.
        self.ids.zero_()
        self.ids[2].fill_(-1)
        self.seq_lens.fill_(1)
        self.block_tables.zero_()
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # outside the capture: compiles kernels, allocates workspaces
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def size_for(self, num_seqs: int) -> int | None:
        """The captured size a decode step of num_seqs replays (None: larger than any)."""
        if num_seqs > self.max_size:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

    def run(
        self,
        size: int,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        block_tables: np.ndarray,
    ) -> torch.Tensor:
        """Replays the graph of `size` on the first n = len(input_ids) rows; returns their
        final hidden states [n, hidden_size]. block_tables [n, width <= max_blocks]."""
        n, width = len(input_ids), block_tables.shape[1]
        ids = self.host_ids
        ids[0, :n], ids[1, :n], ids[2, :n] = input_ids, positions, slot_mapping
        ids[:2, n:size], ids[2, n:size] = 0, -1
        self.host_seq_lens[:n] = positions + 1
        self.host_seq_lens[n:size] = 0
        self.host_tables[:n, :width] = block_tables
        self.ids.copy_(self._host_ids, non_blocking=True)
        self.seq_lens[:size].copy_(self._host_seq_lens[:size], non_blocking=True)
        self.block_tables[:n].copy_(self._host_tables[:n], non_blocking=True)
        self.graphs[size].replay()
        return self.outputs[size][:n]
