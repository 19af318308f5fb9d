from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kernels import paged_attention, write_kv_cache
from worker.layers.rotary import RotaryEmbedding


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the paged KV cache (see kernels.paged_attention).

    Sequence s owns query rows query_start_loc[s] : query_start_loc[s + 1]; its context after
    this step is seq_lens[s] tokens, held in the blocks block_tables[s].
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, -1 = padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int  # host-side bounds of the batch, so kernels launch without a sync
    max_seq_len: int
    one_token_context: int = 0  # tokens the one-token sequences (decodes) attend, summed


class PagedAttention(nn.Module):
    """Writes this step's K/V into the layer's cache, then attends over each sequence's pages."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        # [num_blocks, block_size, num_kv_heads, head_dim] each; set by the model runner.
        self.key_cache = torch.empty(0)
        self.value_cache = torch.empty(0)
        # Set while worker.piecewise_graph captures the forward in pieces: called with this
        # layer and its (rotated) q in place of the attention, it ends the piece and returns
        # the buffer the attention will fill when the pieces replay.
        self.split: Callable[[PagedAttention, torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        rotary: RotaryEmbedding | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim].
        With `rotary`, q and k are rotated at positions [num_tokens] first (on CUDA in the
        cache write's launch). Returns [num_tokens, num_heads, head_dim]."""
        if rotary is None:
            write_kv_cache(k, v, self.key_cache, self.value_cache, meta.slot_mapping)
        else:
            q = rotary.rotate_and_write_kv(
                positions, q, k, v, self.key_cache, self.value_cache, meta.slot_mapping
            )
        if self.split is not None:
            return self.split(self, q)
        return self.attend(q, meta)

    def attend(
        self, q: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The attention of q [num_tokens, num_heads, head_dim] (already rotated, this step's
        K/V already in the cache) over each sequence's pages; fills `out` when given."""
        return paged_attention(
            q,
            self.key_cache,
            self.value_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            self.scale,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            one_token_context=meta.one_token_context,
            out=out,
        )
