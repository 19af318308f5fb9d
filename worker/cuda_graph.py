"""CUDA graphs of the model's forward pass over decode steps, one per batch size of a ladder.

A decode step launches some ten kernels a layer (hundreds for a 32-layer model), and launching
them from Python costs more than running them at small batches. The graphs are captured once,
after the KV cache is allocated, for sizes 1, 2, 4, 8, 16, 24, ... up to max_num_seqs; a step of
b decodes replays the smallest size >= b. Its padding rows write no KV (slot -1) and attend to
nothing (seq_len 0), and their outputs are dropped. A graph runs the model and its LM head: it
leaves this rank's logits and every row's greedy token (the argmax over the whole vocabulary,
the same on every rank), so a step whose rows all decode greedily needs nothing after it. The
tensor-parallel collectives are inside the graphs: every rank captures the same sizes in the
same order.

Static buffers (device), rows [0, size) read by the graph of that size:

    ids        [4, max_size] int64      input_ids | sources | positions | slot_mapping
    sampled    [max_size] int64         the previous step's sampled tokens; the graph then
                                        writes its greedy tokens over them
    seq_lens   [max_size] int32
    block_tables [max_size, max_blocks] int32
    logits     [max_size, vocab_shard]  this rank's logits of the rows (the model's dtype)

Row i's input token is sampled[sources[i]] when sources[i] >= 0 (a token still on its way to
the host; the graph gathers it), else input_ids[i]. The buffers are filled from pinned host
staging (three copies a step). Two sets of staging alternate: a step's set is rewritten two
steps later, after the step between has finished, so its copies have completed. All graphs
share one memory pool, captured largest first.
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
        self._staging = [_Staging(size, width) for _ in range(2)]
        self._num_runs = 0
        self.ids = torch.zeros((4, size), dtype=torch.int64, device=device)
        self.sampled = torch.zeros(size, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros((size, width), dtype=torch.int32, device=device)
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

    def size_for(self, num_seqs: int) -> int | None:
        """The captured size a decode step of num_seqs replays (None: larger than any)."""
        if num_seqs > self.max_size:
            return None
        return next(s for s in self.sizes if s >= num_seqs)

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
        ids = staging.ids
        ids[0, :n], ids[1, :n], ids[2, :n], ids[3, :n] = input_ids, sources, positions, slot_mapping
        ids[0, n:size], ids[1, n:size], ids[2, n:size], ids[3, n:size] = 0, -1, 0, -1
        staging.seq_lens[:n] = positions + 1
        staging.seq_lens[n:size] = 0
        staging.tables[:n, :width] = block_tables
        self.ids.copy_(staging.pinned_ids, non_blocking=True)
        self.seq_lens[:size].copy_(staging.pinned_seq_lens[:size], non_blocking=True)
        self.block_tables[:n].copy_(staging.pinned_tables[:n], non_blocking=True)
        self.graphs[size].replay()
        return self.logits[:n], self.sampled[:n]


class _Staging:
    """Pinned host copies of the graphs' input buffers, with numpy views to fill them."""

    def __init__(self, size: int, width: int) -> None:
        self.pinned_ids = torch.zeros((4, size), dtype=torch.int64, pin_memory=True)
        self.pinned_seq_lens = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self.pinned_tables = torch.zeros((size, width), dtype=torch.int32, pin_memory=True)
        self.ids = self.pinned_ids.numpy()
        self.seq_lens = self.pinned_seq_lens.numpy()
        self.tables = self.pinned_tables.numpy()
