r"""Paged DECODE attention in Triton: one new query token per sequence, split over the context.

Layout and semantics are those of kernels.paged_attention (the reference is the ground truth).
Decode is memory bound: the whole job is to stream every sequence's K/V pages through the SMs
once, at close to the card's copy bandwidth. Two ideas do that:

GQA grouping. One program owns one (sequence, KV head): the GROUP query heads that share that KV
head are one [GROUP_PAD, head_dim] tile, so each K/V tile is loaded once for the whole group and
both products are tensor-core tl.dot calls:

    q [GROUP_PAD, D] x K^T [D, BLOCK_N] -> scores [GROUP_PAD, BLOCK_N]
    p [GROUP_PAD, BLOCK_N] x V [BLOCK_N, D] -> acc [GROUP_PAD, D]

A K/V tile of BLOCK_N tokens spans BLOCK_N / block_size pages when pages are small (each token
row finds its page through the block table), or part of one page when they are large.

Split-K (flash-decoding). num_seqs * num_kv_heads programs cannot fill a card with a small batch,
so each sequence's context is cut into NUM_SPLITS contiguous ranges of whole tiles, one program
each; a second kernel merges their partial softmax states:

    seq s, kv head h, seq_len = 10 tiles, NUM_SPLITS = 4 -> ceil(10 / 4) = 3 tiles per split

    tokens   |t0 t1 t2|t3 t4 t5|t6 t7 t8|t9 . .|        (t = one BLOCK_N tile, last one ragged)
    program   split 0  split 1  split 2  split 3
                 |        |        |        |       each: online softmax over its own tiles
                 v        v        v        v
    workspace (m0,l0,a0) (m1,l1,a1) (m2,l2,a2) (m3,l3,a3)    per query head of the group:
                 \________\___ merge ___/________/             m = running max (log2 domain)
                              |                                l = sum of exp2(score - m)
                M = max_i m_i, w_i = exp2(m_i - M)             a = sum of exp2(score - m) * v
                out = sum_i w_i a_i / sum_i w_i l_i           (a split with no tiles: m = -inf,
                                                                l = 0, a = 0, so w_i = 0)

Each split program reads seq_lens on the device and derives its own tile range, so the launch
(grid, NUM_SPLITS, warps) depends only on batch size, head counts, head_dim, dtype and the SM
count, never on the sequence lengths, and nothing syncs with the host: decode can be captured in
a CUDA graph. With NUM_SPLITS == 1 the split kernel normalises and writes the output itself and
the merge kernel is not launched.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv, dot_pad, dot_precision, next_pow2, num_sms

LOG2E = 1.4426950408889634

# Heuristic constants (see decode_config).
_TILE_BYTES = 16 * 1024  # one K (or V) tile: BLOCK_N * head_dim_pad * itemsize
_PROGRAMS_PER_SM = 2  # split until num_seqs * num_kv_heads * splits >= this many per SM
_MAX_SPLITS = 64


@dataclass(frozen=True)
class DecodeConfig:
    num_splits: int  # context ranges per (sequence, KV head); 1 = no merge kernel
    block_n: int  # tokens per K/V tile (a power of two >= 16)
    num_warps: int
    num_stages: int  # K/V tiles in flight + 1


@functools.cache
def decode_config(
    num_seqs: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    sm_count: int,
) -> DecodeConfig:
    """The launch, from shapes and the SM count only (never from sequence lengths).

    - block_n: a K/V tile of about _TILE_BYTES (64 tokens for bf16 x 128), independent of
      block_size; a tile may span several small pages or a part of one large page.
    - num_splits: enough (sequence, KV head, split) programs for _PROGRAMS_PER_SM per SM, at
      most _MAX_SPLITS; a big batch (num_seqs * num_kv_heads >= 2 * SMs) runs unsplit.
    num_heads and block_size need no tuning: the group tile and the page walk adapt inside.
    - num_stages 2: one K/V tile in flight. The sweep on an H200 (kernels.benchmark --sweep)
      measured it at or above 3 stages on every shape, up to +25% at (64, 4k): less shared
      memory per program, more programs per SM.
    """
    block_n = max(16, min(128, _TILE_BYTES // (dot_pad(head_dim) * dtype.itemsize)))
    programs = max(1, num_seqs * num_kv_heads)
    num_splits = max(1, min(_MAX_SPLITS, cdiv(_PROGRAMS_PER_SM * sm_count, programs)))
    return DecodeConfig(num_splits=num_splits, block_n=block_n, num_warps=4, num_stages=2)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim], written only when DIRECT_OUTPUT
    ws_ptr,  # [num_seqs, num_heads, num_splits, head_dim + 2] fp32: acc, m, l (not DIRECT)
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    num_splits,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_os,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two >= 16 (a tl.dot M)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per page
    BLOCK_N: tl.constexpr,  # tokens per K/V tile
    DIRECT_OUTPUT: tl.constexpr,  # num_splits == 1: normalise and write out_ptr here
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # This split's token range: whole tiles, so only the sequence's last tile is ragged.
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # [GROUP_PAD] query heads of this KV head
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM

    # [GROUP_PAD, HEAD_DIM_PAD]; padding rows / columns are 0
    q = tl.load(
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

    block_table = block_tables_ptr + seq * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    # The block-table entries of the next tile are loaded one iteration ahead (by hand): the
    # K/V loads then depend on no load of their own iteration, so the software pipeliner can
    # keep num_stages - 1 K/V tiles in flight.
    first = start + offs_n
    next_page = tl.load(block_table + first // BLOCK_SIZE, mask=first < end, other=0)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + offs_n  # [BLOCK_N] context positions
        valid = tokens < end
        page = next_page.to(tl.int64)
        ahead = tokens + BLOCK_N
        next_page = tl.load(block_table + ahead // BLOCK_SIZE, mask=ahead < end, other=0)
        slot_k = page * stride_kb + (tokens % BLOCK_SIZE) * stride_kt  # [BLOCK_N] int64
        slot_v = page * stride_vb + (tokens % BLOCK_SIZE) * stride_vt
        kv_mask = valid[:, None] & mask_d[None, :]
        # [BLOCK_N, HEAD_DIM_PAD]
        k = tl.load(k_head + slot_k[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))  # [GROUP_PAD, BLOCK_N]

        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every tile has a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + slot_v[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision=DOT_PRECISION
        )  # [GROUP_PAD, HEAD_DIM_PAD]
        m_i = m_new

    if DIRECT_OUTPUT:
        # seq_len == 0 (a padding entry): l = 0, acc = 0 -> the output is 0, not NaN
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_g[:, None] & mask_d[None, :],
        )
    else:
        row = ws_ptr + ((seq * NUM_HEADS + heads) * num_splits + split) * (HEAD_DIM + 2)
        tl.store(row[:, None] + offs_d[None, :], acc, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(row + HEAD_DIM, m_i, mask=mask_g)
        tl.store(row + HEAD_DIM + 1, l_i, mask=mask_g)


@triton.jit
def _decode_merge_kernel(
    ws_ptr,  # [num_seqs, num_heads, num_splits, head_dim + 2] fp32
    out_ptr,  # [num_seqs, num_heads, head_dim]
    num_splits,
    stride_os,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,  # num_splits rounded up to a power of two
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    rows = ws_ptr + ((seq * NUM_HEADS + head) * num_splits + offs_s) * (HEAD_DIM + 2)
    m = tl.load(rows + HEAD_DIM, mask=mask_s, other=float("-inf"))  # [SPLITS_PAD]
    sums = tl.load(rows + HEAD_DIM + 1, mask=mask_s, other=0.0)  # [SPLITS_PAD]
    acc = tl.load(
        rows[:, None] + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0
    )  # [SPLITS_PAD, HEAD_DIM_PAD]

    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: seq_len == 0
    w = tl.exp2(m - m_max)  # empty splits: exp2(-inf) = 0
    denom = tl.sum(w * sums, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(
        out_ptr + seq * stride_os + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    config: DecodeConfig | None = None,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: query row s is sequence s's one new token (its K/V already cached).

    query [num_seqs, num_heads, head_dim] (any row / head strides, unit last stride);
    key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim];
    block_tables [num_seqs, max_blocks_per_seq] int32; seq_lens [num_seqs] int32 (0 -> zeros).
    Returns (or fills `out`) [num_seqs, num_heads, head_dim] in query's dtype.

    config overrides the launch heuristic (tests, benchmark sweeps); workspace is an optional
    [num_seqs, num_heads, num_splits, head_dim + 2] fp32 buffer for the partial results.
    """
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(key_cache.shape)}")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("head_dim must be the contiguous (last) dimension")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return out
    if config is None:
        config = decode_config(
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            key_cache.dtype,
            num_sms(query.device),
        )
    splits = config.num_splits
    direct = splits == 1
    if direct:
        workspace = out  # unused by the kernel; any pointer will do
    elif workspace is None:
        workspace = torch.empty(
            (num_seqs, num_heads, splits, head_dim + 2), dtype=torch.float32, device=query.device
        )
    group = num_heads // num_kv_heads
    _decode_split_kernel[(num_seqs, num_kv_heads, splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        out,
        workspace,
        scale * LOG2E,
        splits,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=dot_pad(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=dot_pad(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        DIRECT_OUTPUT=direct,
        DOT_PRECISION=dot_precision(key_cache.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if not direct:
        _decode_merge_kernel[(num_seqs, num_heads)](
            workspace,
            out,
            splits,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=next_pow2(head_dim),
            SPLITS_PAD=next_pow2(splits),
            num_warps=4,
        )
    return out
