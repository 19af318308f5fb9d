"""Attention kernels: the one dispatch point the model layers call.

Each kernel has a plain-torch reference beside it. The references run everywhere (the CPU path,
and the ground truth for the Triton kernels' tests); Triton implementations plug in here for
CUDA tensors as they land.
"""

import torch

from kernels.copy_blocks import copy_blocks_ref
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
    *,
    max_query_len: int,
    max_seq_len: int,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context.

    max_query_len / max_seq_len are host-side bounds of the batch (the caller knows them), so
    no kernel launch needs to read a device tensor back.
    """
    return paged_attention_ref(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale
    )


def copy_blocks(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Copies blocks (src, dst) = block_mapping[i] in every layer's K and V cache."""
    copy_blocks_ref(key_caches, value_caches, block_mapping)


__all__ = ["copy_blocks", "paged_attention", "write_kv_cache"]
