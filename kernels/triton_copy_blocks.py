"""Block copy in Triton: whole KV blocks (src -> dst) in every layer's K and V cache
(see kernels.copy_blocks; the copy-on-write of a shared partial block).

One launch per layer (the caches are separate tensors); grid (num_pairs, chunks of a block): each
program copies CHUNK contiguous elements of one block in K and in V. A dst never appears as a
src in the same call, so programs never race.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv

_CHUNK = 2048  # elements per program


@triton.jit
def _copy_blocks_kernel(
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], each block contiguous
    v_cache_ptr,
    block_mapping_ptr,  # [num_pairs, 2] (src, dst), contiguous
    block_numel,  # block_size * num_kv_heads * head_dim
    stride_kb,
    stride_vb,
    CHUNK: tl.constexpr,
):
    pair = tl.program_id(0)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < block_numel
    src = tl.load(block_mapping_ptr + 2 * pair).to(tl.int64)
    dst = tl.load(block_mapping_ptr + 2 * pair + 1).to(tl.int64)
    k = tl.load(k_cache_ptr + src * stride_kb + offs, mask=mask)
    tl.store(k_cache_ptr + dst * stride_kb + offs, k, mask=mask)
    v = tl.load(v_cache_ptr + src * stride_vb + offs, mask=mask)
    tl.store(v_cache_ptr + dst * stride_vb + offs, v, mask=mask)


def _block_is_contiguous(cache: torch.Tensor) -> bool:
    """Dims 1.. of cache [num_blocks, block_size, num_kv_heads, head_dim] are dense."""
    return cache[0].is_contiguous()


def copy_blocks(
    key_caches: list[torch.Tensor],
    value_caches: list[torch.Tensor],
    block_mapping: torch.Tensor,
) -> None:
    """block_mapping [num_pairs, 2] (src, dst) block ids, on any device; caches per layer
    [num_blocks, block_size, num_kv_heads, head_dim] with dense blocks, all on one device."""
    if len(key_caches) != len(value_caches):
        raise ValueError("one value cache per key cache")
    if not key_caches or block_mapping.shape[0] == 0:
        return
    mapping = block_mapping.to(key_caches[0].device, non_blocking=True).contiguous()
    for key_cache, value_cache in zip(key_caches, value_caches, strict=True):
        if not (_block_is_contiguous(key_cache) and _block_is_contiguous(value_cache)):
            raise ValueError("copy_blocks needs each cache block to be contiguous")
        block_numel = key_cache[0].numel()
        grid = (mapping.shape[0], cdiv(block_numel, _CHUNK))
        _copy_blocks_kernel[grid](
            key_cache,
            value_cache,
            mapping,
            block_numel,
            key_cache.stride(0),
            value_cache.stride(0),
            CHUNK=_CHUNK,
            num_warps=4,
        )
