"""KV-cache write in Triton: this step's K/V rows go to their slots (see kernels.kv_cache).

One program per token copies its [num_kv_heads, head_dim] K and V tiles to
slot = block_id * block_size + offset of the paged cache; slot -1 marks a padding token (a CUDA
graph's unused rows) and is skipped. Slots address the cache with int64 arithmetic: a layer's
cache may hold more than 2**31 elements.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import next_pow2


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32 / int64, -1 = padding
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]

    # [HEADS_PAD, HEAD_DIM_PAD]
    k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask)
    v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct
    tl.store(
        k_dst + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask,
    )
    tl.store(
        v_dst + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask,
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key, value [num_tokens, num_kv_heads, head_dim] (unit last stride, any other strides);
    writes in place into key_cache / value_cache [num_blocks, block_size, num_kv_heads,
    head_dim] at slot_mapping [num_tokens] (-1 = padding, skipped), cast to the cache dtype."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = key_cache.shape[1]
    if key_cache.shape[2:] != (num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(f"K/V {tuple(key.shape)} do not fit cache {tuple(key_cache.shape)}")
    if min(key.stride(2), value.stride(2), key_cache.stride(3), value_cache.stride(3)) != 1:
        raise ValueError("head_dim must be the contiguous (last) dimension")
    if num_tokens == 0:
        return
    tile = next_pow2(num_kv_heads) * next_pow2(head_dim)
    _write_kv_cache_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=next_pow2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=next_pow2(head_dim),
        BLOCK_SIZE=block_size,
        num_warps=4 if tile >= 1024 else 1,
    )
