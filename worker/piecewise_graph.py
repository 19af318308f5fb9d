"""CUDA graphs of the model's forward pass in pieces cut at each attention, for the steps the
whole-forward graphs (worker.cuda_graph) do not take: prompt chunks too long to attend one row a
token. Only the attention runs eagerly, between the pieces, with the step's own metadata (the
prefill kernel's grid and tile height follow the batch); everything else replays:

    piece 0                attn 0   piece 1                          attn L-1   piece L
    embed, norm, qkv,      eager    o_proj, norm, MLP, norm, qkv,    eager      o_proj, norm,
    rotary + KV write -> q -> out   rotary + KV write -> q  ...      -> out     MLP, final norm
                                                                                -> hidden

An eager step launches some ten kernels a layer from Python, each launch costing host time
(BENCHMARKS.md measures it); a replayed step launches one graph and one attention kernel a layer.

Captured once, after the KV cache and the decode graphs, for token counts of a ladder up to
max_tokens (piece_sizes); a step of n tokens replays the smallest size >= n. Its padding tokens
(n .. size) embed token 0 at position 0, write no KV (slot -1) and are not attended (attention
sees the step's n tokens only); their rows are dropped. Every op in a piece works on each
token's row alone (matmuls, norms, activations, the sum over ranks), so padding rows never
reach real ones. The collectives are inside the pieces: every rank captures the same sizes in
the same order and replays the same pieces.

Static buffers (device), rows [0, size) used by the pieces of that size:

    inputs   [3, max_size] int64                input_ids | positions | slot_mapping
    q        [max_size, num_heads, head_dim]    each piece's last op copies its layer's q here
    out      [max_size, num_heads, head_dim]    the attention writes here, the next piece reads
    hidden   [max_size, hidden_size]            the last piece's output

q and out serve every layer in turn. What else crosses a cut (the residual stream) lives in the
graphs' one memory pool, shared by every piece and size: pieces replay one at a time, in the
order they were captured within a size, and no other graph replays between them.
"""

from collections.abc import Callable

import torch

from worker.cuda_graph import size_for
from worker.layers.attention import AttentionMetadata, PagedAttention

# (up to, step) of the ladder: small steps where a padded token costs most relative to the step.
_LADDER = ((256, 16), (512, 32), (1024, 64), (1 << 30, 128))


def piece_sizes(max_tokens: int) -> list[int]:
    """16, 32, .. 256, then every 32 up to 512, 64 up to 1024, 128 beyond, up to max_tokens
    (always included)."""
    sizes, size = [], 0
    for limit, step in _LADDER:
        while size + step <= min(limit, max_tokens - 1):
            size += step
            sizes.append(size)
    return [*sizes, max_tokens]


class PiecewiseGraphs:
    def __init__(self, model: torch.nn.Module, max_tokens: int, device: torch.device) -> None:
        self.model = model
        self.sizes = piece_sizes(max_tokens)
        self.max_size = self.sizes[-1]
        self.layers: list[PagedAttention] = model.attention_layers()
        heads, head_dim = self.layers[0].num_heads, self.layers[0].head_dim
        if any((a.num_heads, a.head_dim) != (heads, head_dim) for a in self.layers):
            raise ValueError("piecewise graphs need every layer's attention of one shape")
        weight = model.lm_head.weight  # [vocab_shard, hidden_size]
        size, dtype = self.max_size, weight.dtype
        self.inputs = torch.zeros((3, size), dtype=torch.int64, device=device)
        self.q = torch.zeros((size, heads, head_dim), dtype=dtype, device=device)
        self.out = torch.zeros((size, heads, head_dim), dtype=dtype, device=device)
        self.hidden = torch.zeros((size, weight.shape[1]), dtype=dtype, device=device)
        # What the pieces' attention metadata holds: the slots their KV writes go to (the
        # attention itself, the only reader of the rest, runs outside them).
        no_seqs = torch.zeros((size, 1), dtype=torch.int32, device=device)
        self._meta = AttentionMetadata(
            slot_mapping=self.inputs[2],
            block_tables=no_seqs,
            seq_lens=no_seqs[:, 0],
            query_start_loc=no_seqs[:, 0],
            max_query_len=0,
            max_seq_len=0,
        )
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def forward(
        self,
        size: int,
        meta: AttentionMetadata,
        on_split: Callable[[PagedAttention], None],
    ) -> torch.Tensor:
        """The model over the static inputs' first `size` tokens, each attention replaced by a
        cut: its q copied to `q`, on_split(layer) called, `out` returned in its place. Leaves
        (and returns) the hidden states in `hidden[:size]`."""

        def split(layer: PagedAttention, q: torch.Tensor) -> torch.Tensor:
            self.q[:size].copy_(q)
            on_split(layer)
            return self.out[:size]

        for layer in self.layers:
            layer.split = split
        try:
            inputs = self.inputs
            hidden = self.model(inputs[0, :size], inputs[1, :size], meta)
            return self.hidden[:size].copy_(hidden)
        finally:
            for layer in self.layers:
                layer.split = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every size, largest first, each after one run outside the capture (which
        compiles the kernels and allocates the workspaces it needs)."""
        self.inputs.zero_()
        self.inputs[2].fill_(-1)  # no KV written
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for size in reversed(self.sizes):
            self.forward(size, _slice(self._meta, size), lambda layer: None)
            torch.cuda.synchronize()
            self.graphs[size] = self._capture(size, pool, stream)
        torch.cuda.synchronize()

    def _capture(self, size: int, pool: tuple, stream: torch.cuda.Stream) -> list:
        """The pieces of one size: a capture ends at each cut and the next one begins."""
        pieces = [torch.cuda.CUDAGraph()]
        order: list[PagedAttention] = []

        def cut(layer: PagedAttention) -> None:
            pieces[-1].capture_end()
            order.append(layer)
            pieces.append(torch.cuda.CUDAGraph())
            pieces[-1].capture_begin(pool=pool)

        with torch.cuda.stream(stream):
            pieces[0].capture_begin(pool=pool)
            self.forward(size, _slice(self._meta, size), cut)
            pieces[-1].capture_end()
        if len(order) != len(self.layers) or any(
            a is not b for a, b in zip(order, self.layers, strict=True)
        ):
            raise RuntimeError("the forward pass met its attention layers out of order")
        return pieces

    def size_for(self, num_tokens: int) -> int | None:
        """The captured size a step of num_tokens tokens replays (None: larger than any)."""
        return size_for(self.sizes, num_tokens)

    def run(
        self,
        size: int,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Replays the pieces of `size` over the step's n = len(input_ids) tokens (device
        tensors [n]; meta: the step's, of those n tokens), the attention between them; returns
        the hidden states [n, hidden_size] (a view of `hidden`: the next run overwrites it)."""
        n = len(input_ids)
        inputs = self.inputs
        inputs[0, :n].copy_(input_ids)
        inputs[1, :n].copy_(positions)
        inputs[2, :n].copy_(slot_mapping)
        inputs[2, n:size].fill_(-1)  # earlier steps' slots: the padding writes no KV
        self._replay(size, n, meta)
        return self.hidden[:n]

    def _replay(self, size: int, n: int, meta: AttentionMetadata) -> None:
        """The pieces of `size`, the attention of the step's n tokens between them."""
        pieces = self.graphs[size]
        q, out = self.q[:n], self.out[:n]
        pieces[0].replay()
        for layer, piece in zip(self.layers, pieces[1:], strict=True):
            layer.attend(q, meta, out=out)
            piece.replay()


def _slice(meta: AttentionMetadata, size: int) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping[:size],
        block_tables=meta.block_tables[:size],
        seq_lens=meta.seq_lens[:size],
        query_start_loc=meta.query_start_loc[: size + 1],
        max_query_len=meta.max_query_len,
        max_seq_len=meta.max_seq_len,
    )
