"""Block copy: whole KV blocks from one id to another, in every layer's cache (copy-on-write
of a shared partial block; swap between device and host caches uses the same mapping)."""

import torch


def copy_blocks_ref(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """block_mapping: [num_pairs, 2] int64 (src, dst); caches [num_blocks, block_size, ...].

    A dst never appears as a src in the same call, so the order of pairs does not matter.
    """
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for key_cache, value_cache in zip(key_caches, value_caches, strict=True):
        key_cache[dst] = key_cache[src]
        value_cache[dst] = value_cache[src]
