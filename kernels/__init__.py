"""Attention kernels: the one dispatch point the model layers call.

Each kernel has a plain-torch reference beside it. The references run everywhere (the CPU path,
and the ground truth for the Triton kernels' tests); Triton implementations plug in here for
CUDA tensors as they land.
"""

import torch

from kernels.kv_cache import write_kv_cache_ref
from kernels.paged_attention import paged_attention_ref


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores this step's K/V [num_tokens, num_kv_heads, head_dim] at slot_mapping (-1 skips)."""
    write_kv_cache_ref(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context."""
    return paged_attention_ref(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale
    )


__all__ = ["paged_attention", "write_kv_cache"]
