"""KV-cache write: the new tokens' K/V go into their slots (see kernels.paged_attention)."""

import torch


def write_kv_cache_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens], -1 = padding.

    Writes in place into key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_dim].
    """
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(value_cache.dtype)
