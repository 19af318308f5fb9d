"""Rotary position embedding in Triton, q and k in one launch (see kernels.rotary, the reference).

Grid: (token, block of heads), the head blocks of q first, then those of k. Each program reads
its token's position and the cos/sin rows of the float32 caches once, and rotates BLOCK_H heads
as one [BLOCK_H, head_dim / 2] tile per half. Why not one program per token (each cos/sin row
read once, not once per head block): a decode step has few tokens (1 to a few hundred), and
one program per token would leave most of the SMs idle there; the extra cos/sin reads are
2 * head_dim floats per program, from the L2 after the first. The head blocks of q and k are
sized separately (BLOCK_HQ, BLOCK_HK), so that neither pads the other's (few) heads.

Rounding follows the reference (one torch op, one rounding to x's dtype, each):
    c, s   = cos, sin rounded to x's dtype
    p1, p2 = x * c, rotate_half(x) * s  each rounded to x's dtype
    out    = p1 + p2                    rounded to x's dtype
Half-precision values are multiplied and added in float32 and rounded once: the products of
two fp16 or bf16 values are exact in float32, and float32 has >= 2p + 2 bits for p = 11 (fp16)
and 8 (bf16), so rounding a float32 sum to half precision is the correctly rounded half sum, as
torch's (float "opmath") kernels give. The launch turns FMA contraction off
(enable_fp_fusion=False): for float32 inputs the casts are no-ops, and p1 + p2 would otherwise
be fused into fma(x, c, p2). Hence the output is bit-identical to the reference on the GPU, in
every dtype (under the CPU interpreter too, but for bf16, which the interpreter gets wrong).
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv, next_pow2

# Elements of x per program at most (BLOCK_H * head_dim, padded): 16 heads of 128.
MAX_TILE = 2048


@triton.jit
def _round_mul(a, b):
    """a * b in a's dtype, rounded once (exact float32 product of two half-precision values)."""
    return (a.to(tl.float32) * b.to(tl.float32)).to(a.dtype)


@triton.jit
def _round_add(a, b):
    """a + b in a's dtype, rounded once (see the module docstring for half precision)."""
    return (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)


@triton.jit
def cos_sin_rows(
    positions_ptr,  # [num_tokens] int64
    cos_ptr,  # [max_positions, head_dim], unit last stride
    sin_ptr,  # cos's strides
    stride_cos,
    token,  # int64
    half,  # head_dim / 2
    dtype: tl.constexpr,  # x's dtype
    BLOCK_HALF: tl.constexpr,  # next_pow2(half)
):
    """The token's cos/sin rows as halves [1, BLOCK_HALF] (cos1 = cos[:half], cos2 = cos[half:],
    likewise sin), rounded to x's dtype first as the reference does."""
    pos = tl.load(positions_ptr + token)
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = offs < half
    cos1_ptrs = cos_ptr + pos * stride_cos + offs
    sin1_ptrs = sin_ptr + pos * stride_cos + offs
    cos1 = tl.load(cos1_ptrs, mask=dmask, other=0.0).to(dtype)
    cos2 = tl.load(cos1_ptrs + half, mask=dmask, other=0.0).to(dtype)
    sin1 = tl.load(sin1_ptrs, mask=dmask, other=0.0).to(dtype)
    sin2 = tl.load(sin1_ptrs + half, mask=dmask, other=0.0).to(dtype)
    return cos1, cos2, sin1, sin2


@triton.jit
def rotate_heads(
    x_ptr,  # [num_tokens, num_heads, head_dim], unit last stride
    out_ptr,  # [num_tokens, num_heads, head_dim], x's dtype
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    token,  # int64
    head0,  # first head of this program's block
    num_heads,
    half,  # head_dim / 2
    cos1,  # [1, BLOCK_HALF] cos[:half], x's dtype (likewise cos2 = cos[half:], sin1, sin2)
    cos2,
    sin1,
    sin2,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next_pow2(half)
):
    heads = head0 + tl.arange(0, BLOCK_H)[:, None]  # [BLOCK_H, 1]
    offs = tl.arange(0, BLOCK_HALF)[None, :]  # [1, BLOCK_HALF]
    mask = (heads < num_heads) & (offs < half)
    x1_ptrs = x_ptr + token * stride_xt + heads * stride_xh + offs
    x1 = tl.load(x1_ptrs, mask=mask, other=0.0)
    x2 = tl.load(x1_ptrs + half, mask=mask, other=0.0)
    # rotate_half(x) = [-x2, x1]: out1 = x1 * cos1 + (-x2) * sin1, out2 = x2 * cos2 + x1 * sin2.
    out1 = _round_add(_round_mul(x1, cos1), _round_mul(-x2, sin1))
    out2 = _round_add(_round_mul(x2, cos2), _round_mul(x1, sin2))
    out1_ptrs = out_ptr + token * stride_ot + heads * stride_oh + offs
    tl.store(out1_ptrs, out1, mask=mask)
    tl.store(out1_ptrs + half, out2, mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int64, each in [0, max_positions)
    q_ptr,  # [num_tokens, num_heads, head_dim], unit last stride
    k_ptr,  # [num_tokens, num_kv_heads, head_dim], unit last stride, q's dtype
    cos_ptr,  # [max_positions, head_dim], unit last stride (float32 in the model)
    sin_ptr,  # [max_positions, head_dim], cos's strides
    q_out_ptr,  # [num_tokens, num_heads, head_dim], q's dtype
    k_out_ptr,  # [num_tokens, num_kv_heads, head_dim], q's dtype
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cos,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    num_heads,
    num_kv_heads,
    half,  # head_dim / 2
    num_q_blocks,  # cdiv(num_heads, BLOCK_HQ): program_id(1) below it rotates q, else k
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # next_pow2(half)
):
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
        rotate_heads(
            k_ptr,
            k_out_ptr,
            stride_kt,
            stride_kh,
            stride_kot,
            stride_koh,
            token,
            (block - num_q_blocks) * BLOCK_HK,
            num_kv_heads,
            half,
            cos1,
            cos2,
            sin1,
            sin2,
            BLOCK_HK,
            BLOCK_HALF,
        )


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def check_rotary_args(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> None:
    """Raises ValueError unless q, k, positions and the cos/sin caches fit (see rotary)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if k.shape != (num_tokens, num_kv_heads, head_dim) or k.dtype != q.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} does not fit q {tuple(q.shape)} {q.dtype}")
    if positions.shape != (num_tokens,):
        raise ValueError(f"positions {tuple(positions.shape)} != ({num_tokens},)")
    if head_dim % 2 or cos_cache.shape[1:] != (head_dim,) or sin_cache.shape != cos_cache.shape:
        raise ValueError(
            f"rotary: head_dim {head_dim} must be even and match cos/sin caches "
            f"{tuple(cos_cache.shape)}, {tuple(sin_cache.shape)}"
        )


def rotary_tiles(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_HALF, BLOCK_HQ, BLOCK_HK, num_warps) of a launch: head blocks of at most MAX_TILE
    elements, about 8 elements of each half per thread at the larger tile (128-bit loads in
    bf16)."""
    block_half = next_pow2(head_dim // 2)
    max_heads = max(1, MAX_TILE // (2 * block_half))
    block_hq = min(next_pow2(num_heads), max_heads)
    block_hk = min(next_pow2(num_kv_heads), max_heads)
    num_warps = min(4, max(1, max(block_hq, block_hk) * block_half // 256))
    return block_half, block_hq, block_hk, num_warps


def output_like(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`out` checked against `like` (shape, dtype, unit last stride: the kernel writes into it),
    or a new contiguous tensor."""
    if out is None:
        return torch.empty(like.shape, dtype=like.dtype, device=like.device)
    if out.shape != like.shape or out.dtype != like.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"output {tuple(out.shape)} {out.dtype} (last stride {out.stride(-1)}) does not fit "
            f"{tuple(like.shape)} {like.dtype} with a unit last stride"
        )
    return out


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    *,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads,
    head_dim] (q's dtype; any token and head strides, e.g. views of a merged QKV output, unit
    last stride preferred) at positions [num_tokens] (int64, each in [0, max_positions): not
    checked, that would need a host sync), with rows of cos_cache, sin_cache [max_positions,
    head_dim]. Returns (q_out, k_out), new contiguous tensors, or `q_out` / `k_out` filled when
    given (q's / k's shape and dtype, unit last stride; neither may alias an input)."""
    check_rotary_args(positions, q, k, cos_cache, sin_cache)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_out = output_like(q_out, q)
    k_out = output_like(k_out, k)
    if num_tokens == 0:
        return q_out, k_out
    # No-ops for the model's inputs (views of the QKV output, a fresh positions tensor, caches).
    q, k = unit_last_stride(q), unit_last_stride(k)
    positions = positions.contiguous()
    cos_cache, sin_cache = cos_cache.contiguous(), sin_cache.contiguous()
    half = head_dim // 2
    block_half, block_hq, block_hk, num_warps = rotary_tiles(num_heads, num_kv_heads, head_dim)
    num_q_blocks = cdiv(num_heads, block_hq)
    _rotary_kernel[(num_tokens, num_q_blocks + cdiv(num_kv_heads, block_hk))](
        positions,
        q,
        k,
        cos_cache,
        sin_cache,
        q_out,
        k_out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_cache.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        num_heads,
        num_kv_heads,
        half,
        num_q_blocks,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )
    return q_out, k_out
