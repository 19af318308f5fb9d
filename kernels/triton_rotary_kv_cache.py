"""Rotary embedding and the KV-cache write in one Triton launch (references: kernels.rotary, then
kernels.kv_cache).

An attention layer with rotary positions rotates q and k, then stores k and v in the paged
cache; the rotated k is read back only from the cache. This kernel does the three in one pass:

    grid (token, block of heads): the head blocks of q first, then those of the KV heads
      q block  -> rotated q heads -> q_out[token]
      kv block -> rotated k heads -> key_cache[slot // block_size, slot % block_size]
                  v heads         -> value_cache[same place]
    slot = slot_mapping[token]; -1 (padding: a CUDA graph's unused rows) skips the cache write

so a decode step pays one launch where it paid two, and k never makes a round trip through
memory. The arithmetic is kernels.triton_rotary's (rotate_heads, FMA contraction off), so q_out
and the cached k are bit-identical to the reference's on the GPU; the cache write casts to the
cache's dtype as kernels.kv_cache does.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv
from kernels.triton_pdl import pdl_enter, use_pdl
from kernels.triton_rotary import (
    check_rotary_args,
    cos_sin_rows,
    output_like,
    rotary_tiles,
    rotate_heads,
    unit_last_stride,
)


@triton.jit
def _rotary_kv_cache_kernel(
    positions_ptr,  # [num_tokens] int64, each in [0, max_positions)
    q_ptr,  # [num_tokens, num_heads, head_dim], unit last stride
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], unit last stride, q's dtype
    v_ptr,  # [num_tokens, num_kv_heads, head_dim], unit last stride
    cos_ptr,  # [max_positions, head_dim], unit last stride (float32 in the model)
    sin_ptr,  # [max_positions, head_dim], cos's strides
    q_out_ptr,  # [num_tokens, num_heads, head_dim], q's dtype
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], unit last stride
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim], unit last stride
    slot_mapping_ptr,  # [num_tokens] int32 / int64, -1 = padding
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_qot,
    stride_qoh,
    stride_kcb,
    stride_kct,
    stride_kch,
    stride_vcb,
    stride_vct,
    stride_vch,
    num_heads,
    num_kv_heads,
    half,  # head_dim / 2
    num_q_blocks,  # cdiv(num_heads, BLOCK_HQ): program_id(1) below it rotates q, else k and v
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next_pow2(half)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cos1, cos2, sin1, sin2 = cos_sin_rows(
        positions_ptr, cos_ptr, sin_ptr, stride_cos, token, half, q_ptr.dtype.element_ty, BLOCK_HALF
    )
    if block < num_q_blocks:
        rotate_heads(
            q_ptr,
            q_out_ptr,
            stride_qt,
            stride_qh,
            stride_qot,
            stride_qoh,
            token,
            block * BLOCK_HQ,
            num_heads,
            half,
            cos1,
            cos2,
            sin1,
            sin2,
            BLOCK_HQ,
            BLOCK_HALF,
        )
    else:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            head0 = (block - num_q_blocks) * BLOCK_HK
            cache_block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
            # The token's row of the cache; rotate_heads adds token * (its token stride, 0 here).
            k_row = k_cache_ptr + cache_block * stride_kcb + offset * stride_kct
            v_row = v_cache_ptr + cache_block * stride_vcb + offset * stride_vct
            rotate_heads(
                k_ptr,
                k_row,
                stride_kt,
                stride_kh,
                0,
                stride_kch,
                token,
                head0,
                num_kv_heads,
                half,
                cos1,
                cos2,
                sin1,
                sin2,
                BLOCK_HK,
                BLOCK_HALF,
            )
            heads = head0 + tl.arange(0, BLOCK_HK)[:, None]  # [BLOCK_HK, 1]
            offs = tl.arange(0, 2 * BLOCK_HALF)[None, :]  # [1, 2 * BLOCK_HALF]
            mask = (heads < num_kv_heads) & (offs < 2 * half)
            v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + offs, mask=mask)
            tl.store(
                v_row + heads * stride_vch + offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask
            )


def rotary_write_kv_cache(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotates q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads, head_dim]
    at positions [num_tokens] (as kernels.triton_rotary.rotary), and stores the rotated k and
    v (k's shape) in key_cache / value_cache [num_blocks, block_size, num_kv_heads, head_dim] at
    slot_mapping [num_tokens] (-1 = padding, skipped; as kernels.triton_kv_cache). Returns the
    rotated q: a new contiguous tensor, or `q_out` filled when given (q's shape and dtype, unit
    last stride, not aliasing an input). k is not modified."""
    check_rotary_args(positions, q, k, cos_cache, sin_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if v.shape != k.shape or key_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"k {tuple(k.shape)}, v {tuple(v.shape)} do not fit cache {tuple(key_cache.shape)}"
        )
    if value_cache.shape != key_cache.shape or slot_mapping.shape != (num_tokens,):
        raise ValueError(
            f"value cache {tuple(value_cache.shape)} / slots {tuple(slot_mapping.shape)} do not "
            f"fit key cache {tuple(key_cache.shape)} / {num_tokens} tokens"
        )
    if key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("the caches' head_dim must be their contiguous (last) dimension")
    q_out = output_like(q_out, q)
    if num_tokens == 0:
        return q_out
    # No-ops for the model's inputs (views of the QKV output, a fresh positions tensor, caches).
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    positions = positions.contiguous()
    cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    block_half, block_hq, block_hk, num_warps = rotary_tiles(num_heads, num_kv_heads, head_dim)
    num_q_blocks = cdiv(num_heads, block_hq)
    pdl = use_pdl(q.device)
    _rotary_kv_cache_kernel[(num_tokens, num_q_blocks + cdiv(num_kv_heads, block_hk))](
        positions,
        q,
        k,
        v,
        cos_cache,
        sin_cache,
        q_out,
        key_cache,
        value_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos_cache.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        num_heads,
        num_kv_heads,
        head_dim // 2,
        num_q_blocks,
        BLOCK_SIZE=key_cache.shape[1],
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
        enable_fp_fusion=False,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return q_out
