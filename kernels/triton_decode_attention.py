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
each. The programs of one (sequence, KV head) store their partial softmax states, and the last of
them to finish merges them, in the same launch (no second kernel):

    seq s, kv head h, seq_len = 10 tiles, NUM_SPLITS = 4 -> ceil(10 / 4) = 3 tiles per split

    tokens   |t0 t1 t2|t3 t4 t5|t6 t7 t8|t9 . .|        (t = one BLOCK_N tile, last one ragged)
    program   split 0  split 1  split 2  split 3
                 |        |        |        |       each: online softmax over its own tiles
                 v        v        v        v
    workspace (m0,l0,a0) (m1,l1,a1) (m2,l2,a2) (m3,l3,a3)    per query head of the group:
                 |        |        |        |                m = running max (log2 domain)
                 v        v        v        v                l = sum of exp2(score - m)
    ticket    atomic_add(counter[s, h], 1) -> 0, 1, 2, 3     a = sum of exp2(score - m) * v
              in whatever order the programs finish          (a split with no tiles: m = -inf,
                                                              l = 0, a = 0, so w_i = 0)
    the program that draws ticket NUM_SPLITS - 1 (all others have stored) merges:
                M = max_i m_i, w_i = exp2(m_i - M)
                out = sum_i w_i a_i / sum_i w_i l_i
              and sets counter[s, h] back to 0 for the next call (or CUDA-graph replay).

The counters are one int32 per (sequence, KV head) in a zeroed buffer that stays allocated per
device (_ticket_counters); every launch leaves them at 0. Ordering: each program stores its
partials, a barrier makes every thread's stores precede the ticket, and the ticket atomic is
acq_rel at GPU scope, so the last program's reads, ordered after its own ticket, see every other
program's stores (the merge reads them through L2, .cg, besides).

Each split program reads seq_lens on the device and derives its own tile range, so the launch
(grid, NUM_SPLITS, warps) depends only on batch size, head counts, head_dim, dtype and the SM
count, never on the sequence lengths, and nothing syncs with the host: decode can be captured in
a CUDA graph. With NUM_SPLITS == 1 the program normalises and writes the output itself, with no
workspace and no ticket.
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
_MERGE_ELEMENTS_PER_THREAD = 64  # fp32 workspace values one merge step loads per thread
_MIN_TICKETS = 4096  # (sequence, KV head) counters allocated at least (16 KiB per device)


@dataclass(frozen=True)
class DecodeConfig:
    num_splits: int  # context ranges per (sequence, KV head); 1 = no workspace, no merge
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
    out_ptr,  # [num_seqs, num_heads, head_dim]
    ws_ptr,  # [num_seqs, num_heads, num_splits, head_dim + 2] fp32: acc, m, l (not DIRECT)
    counters_ptr,  # [>= num_seqs * num_kv_heads] int32, all 0 between launches (not DIRECT)
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
    GROUP_P2: tl.constexpr,  # GROUP rounded up to a power of two (merge tile rows)
    SPLIT_CHUNK: tl.constexpr,  # splits the merge loads per step (a power of two)
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
        # The ticket: every thread of this program has stored before it is drawn (barrier),
        # and the acq_rel atomic releases those stores and, for the last program, acquires
        # the other programs' (each released with its own ticket).
        tl.debug_barrier()
        counter = counters_ptr + seq * tl.num_programs(1) + kv_head
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if ticket == num_splits - 1:  # every other split of (seq, kv_head) has stored
            _merge_splits(
                ws_ptr,
                out_ptr,
                seq,
                kv_head,
                num_splits,
                stride_os,
                stride_oh,
                NUM_HEADS,
                GROUP,
                GROUP_P2,
                HEAD_DIM,
                HEAD_DIM_PAD,
                SPLIT_CHUNK,
            )
            tl.store(counter, 0)  # no program of this launch touches it again


@triton.jit
def _merge_splits(
    ws_ptr,
    out_ptr,
    seq,
    kv_head,
    num_splits,
    stride_os,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """out for the GROUP query heads of (seq, kv_head) from the partial states of all splits,
    SPLIT_CHUNK splits a step (an online merge: a running max, sum and accumulator per head)."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_c = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    first_row = (seq * NUM_HEADS + heads) * num_splits  # [GROUP_P2] each head's split 0

    m_run = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([GROUP_P2], dtype=tl.float32)
    acc = tl.zeros([GROUP_P2, HEAD_DIM_PAD], dtype=tl.float32)
    for chunk in range(0, num_splits, SPLIT_CHUNK):
        splits = chunk + offs_c
        mask_gc = mask_g[:, None] & (splits < num_splits)[None, :]
        rows = ws_ptr + (first_row[:, None] + splits[None, :]) * (HEAD_DIM + 2)  # [G, C]
        # .cg: read through L2, where the other programs' stores are
        m = tl.load(rows + HEAD_DIM, mask=mask_gc, other=float("-inf"), cache_modifier=".cg")
        sums = tl.load(rows + HEAD_DIM + 1, mask=mask_gc, other=0.0, cache_modifier=".cg")
        parts = tl.load(
            rows[:, :, None] + offs_d[None, None, :],
            mask=mask_gc[:, :, None] & mask_d[None, None, :],
            other=0.0,
            cache_modifier=".cg",
        )  # [GROUP_P2, SPLIT_CHUNK, HEAD_DIM_PAD]
        m_new = tl.maximum(m_run, tl.max(m, 1))
        # all splits so far empty (seq_len == 0, or padding rows): -inf -> 0, so every
        # weight below is exp2(-inf) = 0, never NaN
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_run - m_ref)
        w = tl.exp2(m - m_ref[:, None])  # [GROUP_P2, SPLIT_CHUNK]; empty splits: 0
        l_run = l_run * alpha + tl.sum(w * sums, 1)
        acc = acc * alpha[:, None] + tl.sum(parts * w[:, :, None], 1)
        m_run = m_new

    out = acc / tl.where(l_run > 0.0, l_run, 1.0)[:, None]
    tl.store(
        out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & mask_d[None, :],
    )


# device -> the ticket counters, newest (largest) last; older ones stay alive, since a captured
# CUDA graph may hold their address.
_TICKETS: dict[torch.device, list[torch.Tensor]] = {}


def _ticket_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` int32 counters, all 0 between launches (each launch resets those it
    used). Allocated once per device and kept, so a CUDA graph can capture their address; grown
    (rarely: _MIN_TICKETS covers any split launch of decode_config) only outside a capture."""
    buffers = _TICKETS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "decode_attention: run it once outside CUDA-graph capture first (it allocates "
                f"its {count} split counters then)"
            )
        buffers.append(torch.zeros(max(count, _MIN_TICKETS), dtype=torch.int32, device=device))
    return buffers[-1]


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
    Split launches on one device share its ticket counters: they must not run concurrently
    (on two streams at once).
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
    group = num_heads // num_kv_heads
    head_dim_pad = dot_pad(head_dim)
    if direct:
        workspace = counters = out  # unused by the kernel; any pointer will do
        split_chunk = 1
    else:
        if workspace is None:
            workspace = torch.empty(
                (num_seqs, num_heads, splits, head_dim + 2),
                dtype=torch.float32,
                device=query.device,
            )
        counters = _ticket_counters(query.device, num_seqs * num_kv_heads)
        merge_elements = _MERGE_ELEMENTS_PER_THREAD * 32 * config.num_warps
        split_chunk = max(
            1, min(next_pow2(splits), merge_elements // (next_pow2(group) * head_dim_pad))
        )
    _decode_split_kernel[(num_seqs, num_kv_heads, splits)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        out,
        workspace,
        counters,
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
        HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size,
        BLOCK_N=config.block_n,
        DIRECT_OUTPUT=direct,
        GROUP_P2=next_pow2(group),
        SPLIT_CHUNK=split_chunk,
        DOT_PRECISION=dot_precision(key_cache.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out
