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
row finds its page through the block table), or part of one page when they are large. K and V
share their strides, so one int64 row offset per token addresses both.

Split-K (flash-decoding). num_seqs * num_kv_heads programs cannot fill a card with a small batch,
so the launch has num_splits programs per (sequence, KV head). How many of them a sequence uses
is decided inside, from its length: `active = clamp(tiles, 1, num_splits)` (a short sequence
takes no empty splits, and a one-tile one no merge); the programs beyond `active` exit at once.
Split i takes the tiles i, i + active, i + 2 * active... (interleaved: its first tile's address
needs no seq_len, so the block-table read for it is issued alongside the seq_len read, not after
it):

    seq s, kv head h, 10 tiles, num_splits = 4 -> active = 4
    seq r, kv head h,  3 tiles, num_splits = 4 -> active = 3, split 3: no work, no ticket

    tiles    t0 t1 t2 t3 t4 t5 t6 t7 t8 t9       (t = one BLOCK_N tile, the last one ragged)
    split     0  1  2  3  0  1  2  3  0  1
                 each: online softmax over its own tiles, then its partial state
    workspace (m_i, l_i, a_i) per split i and     m = running max (log2 domain)
              query head of the group             l = sum of exp2(score - m)
                                                  a = sum of exp2(score - m) * v
    ticket    atomic_add(counter[s, h], 1) -> 0 .. active - 1, in whatever order they finish
    the program that draws ticket active - 1 (all others have stored) merges:
                M = max_i m_i, w_i = exp2(m_i - M)
                out = sum_i w_i a_i / sum_i w_i l_i
              and sets counter[s, h] back to 0 for the next call (or CUDA-graph replay).
    active == 1 (a short sequence, or num_splits == 1): that program normalises and writes the
    output itself, with no workspace and no ticket.

The counters are one int32 per (sequence, KV head) in a zeroed buffer that stays allocated per
device (_ticket_counters); every launch leaves them at 0. Ordering: each program stores its
partials, a barrier makes every thread's stores precede the ticket, and the ticket atomic is
acq_rel at GPU scope, so the last program's reads, ordered after its own ticket, see every other
program's stores (the merge reads them through L2, .cg, besides).

The launch (grid, num_splits, tile, warps, stages) depends only on batch size, head counts,
head_dim, dtype and the SM count, never on the sequence lengths, and nothing syncs with the
host: decode can be captured in a CUDA graph.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_launch import dot_pad, dot_precision, next_pow2, num_sms
from kernels.triton_pdl import pdl_enter, use_pdl

LOG2E = 1.4426950408889634

# Heuristic constants (see decode_config).
_TILE_BYTES = 16 * 1024  # one K (or V) tile: BLOCK_N * head_dim_pad * itemsize
_PROGRAMS_PER_SM = 3  # split programs per SM the launch aims for (one wave, 1 tile in flight each)
_MAX_SPLITS = 16  # the merge, the launch's tail, grows with the splits
_MERGE_ELEMENTS_PER_THREAD = 32  # fp32 partial-accumulator values one merge step loads a thread
_MIN_TICKETS = 4096  # (sequence, KV head) counters allocated at least (16 KiB per device)


@dataclass(frozen=True)
class DecodeConfig:
    num_splits: int  # programs per (sequence, KV head); 1 = no workspace, no merge
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
    - num_splits: as many (sequence, KV head, split) programs as fit _PROGRAMS_PER_SM per SM
      (rounded down: one wave, no ragged second one), at most _MAX_SPLITS; a batch with
      num_seqs * num_kv_heads > 1.5 per SM runs unsplit. The cap keeps the merge by
      the last split to finish short (one 4k sequence on an H100, in a CUDA graph: 16 splits
      of 3 stages 16.9 us, 64 splits of 2 stages 19.6 us; equal at 32k).
    - num_stages 2 (one K/V tile in flight per program; about 39 KB of shared memory and 112
      registers, so 3-4 programs per SM), or 3 (two tiles in flight) when the grid has no more
      programs than SMs (the cap leaves one sequence at 16 splits x 8 KV heads = 128 programs).
      More tiles in flight per SM measured slower, as did a second wave of programs.
    num_heads and block_size need no tuning: the group tile and the page walk adapt inside.
    """
    block_n = max(16, min(128, _TILE_BYTES // (dot_pad(head_dim) * dtype.itemsize)))
    programs = max(1, num_seqs * num_kv_heads)
    num_splits = max(1, min(_MAX_SPLITS, _PROGRAMS_PER_SM * sm_count // programs))
    stages = 3 if programs * num_splits <= sm_count else 2
    return DecodeConfig(num_splits=num_splits, block_n=block_n, num_warps=4, num_stages=stages)


def workspace_numel(num_seqs: int, num_heads: int, head_dim: int, num_splits: int) -> int:
    """fp32 elements of a split launch's workspace: the partial accumulators
    [num_seqs, num_heads, num_splits, dot_pad(head_dim)] (rows 64-byte aligned), then m and l,
    each [num_seqs, num_heads, num_splits]."""
    return num_seqs * num_heads * num_splits * (dot_pad(head_dim) + 2)


@triton.jit
def _decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # same shape and strides as the K cache
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim]
    ws_ptr,  # fp32, workspace_numel(...) (not SPLIT)
    counters_ptr,  # [>= num_seqs * num_kv_heads] int32, all 0 between launches (not SPLIT)
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain
    num_splits,
    max_blocks,  # block table width
    stride_qs,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
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
    SPLIT: tl.constexpr,  # num_splits > 1: the workspace / ticket path exists
    GROUP_P2: tl.constexpr,  # GROUP rounded up to a power of two (merge tile rows)
    SPLITS_P2: tl.constexpr,  # num_splits rounded up to a power of two
    SPLIT_CHUNK: tl.constexpr,  # splits the merge loads per step (a power of two <= SPLITS_P2)
    DOT_PRECISION: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # [GROUP_PAD] query heads of this KV head
    mask_gd = (offs_g < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]

    # Issued together, none waiting on another: seq_len, q, and the block-table entries of this
    # split's first tile (tile `split`; bounded by the table's width, not by seq_len).
    seq_len = tl.load(seq_lens_ptr + seq)
    q = tl.load(  # [GROUP_PAD, HEAD_DIM_PAD]; padding rows / columns are 0
        q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_gd,
        other=0.0,
    ).to(k_cache_ptr.dtype.element_ty)
    block_table = block_tables_ptr + seq * stride_bt
    first = split * BLOCK_N + offs_n
    next_page = tl.load(
        block_table + first // BLOCK_SIZE, mask=first // BLOCK_SIZE < max_blocks, other=0
    )  # [BLOCK_N] int32

    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    active = tl.minimum(tl.maximum(num_tiles, 1), num_splits)  # splits this sequence uses
    if split < active:
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
        k_head = k_cache_ptr + kv_head * stride_kh
        v_head = v_cache_ptr + kv_head * stride_kh
        step = active * BLOCK_N  # tokens between this split's consecutive tiles
        # The block-table entries of the next tile are loaded one iteration ahead (by hand):
        # the K/V loads then depend on no load of their own iteration, so the software
        # pipeliner can keep num_stages - 1 K/V tiles in flight.
        for tile_start in range(split * BLOCK_N, seq_len, step):
            tokens = tile_start + offs_n  # [BLOCK_N] context positions
            valid = tokens < seq_len
            page = next_page
            ahead = tokens + step
            next_page = tl.load(block_table + ahead // BLOCK_SIZE, mask=ahead < seq_len, other=0)
            # [BLOCK_N] int64 element offset of each token's row, the same in K and V
            rows = page.to(tl.int64) * stride_kb + (tokens % BLOCK_SIZE) * stride_kt
            if HEAD_DIM == HEAD_DIM_PAD:
                kv_mask = valid[:, None]
            else:
                kv_mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
            # [BLOCK_N, HEAD_DIM_PAD]
            k = tl.load(k_head + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            scores = tl.where(valid[None, :], scores, float("-inf"))  # [GROUP_PAD, BLOCK_N]

            m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every tile has a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(scores - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(
                p.to(v.dtype), v, input_precision=DOT_PRECISION
            )  # [GROUP_PAD, HEAD_DIM_PAD]
            m_i = m_new

        out_rows = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
        if not SPLIT:
            _store_normalised(out_rows, acc, l_i, mask_gd)
        elif active == 1:
            _store_normalised(out_rows, acc, l_i, mask_gd)
        else:
            num_rows = tl.num_programs(0) * NUM_HEADS * num_splits  # workspace rows
            row = (seq * NUM_HEADS + heads) * num_splits + split  # [GROUP_PAD]
            tl.store(ws_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc, mask=mask_gd)
            m_ptr = ws_ptr + num_rows * HEAD_DIM_PAD
            tl.store(m_ptr + row, m_i, mask=offs_g < GROUP)
            tl.store(m_ptr + num_rows + row, l_i, mask=offs_g < GROUP)
            # The ticket: every thread of this program has stored before it is drawn
            # (barrier), and the acq_rel atomic releases those stores and, for the last
            # program, acquires the other programs' (each released with its own ticket).
            tl.debug_barrier()
            counter = counters_ptr + seq * tl.num_programs(1) + kv_head
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == active - 1:  # every other active split of (seq, kv_head) has stored
                _merge_splits(
                    ws_ptr,
                    m_ptr,
                    num_rows,
                    out_ptr,
                    seq,
                    kv_head,
                    num_splits,
                    active,
                    stride_os,
                    stride_oh,
                    NUM_HEADS,
                    GROUP,
                    GROUP_P2,
                    HEAD_DIM,
                    HEAD_DIM_PAD,
                    SPLITS_P2,
                    SPLIT_CHUNK,
                )
                tl.store(counter, 0)  # no program of this launch touches it again


@triton.jit
def _store_normalised(out_rows, acc, l_i, mask):
    """out = acc / l; seq_len == 0 (a padding entry): l = 0, acc = 0 -> 0, not NaN."""
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_rows, out.to(out_rows.dtype.element_ty), mask=mask)


@triton.jit
def _merge_splits(
    ws_ptr,
    m_ptr,
    num_rows,
    out_ptr,
    seq,
    kv_head,
    num_splits,
    active,
    stride_os,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):
    """out for the GROUP query heads of (seq, kv_head) from the partial states of its `active`
    splits. The maxima and sums of all splits come in one [GROUP_P2, SPLITS_P2] load, so the
    accumulators need no rescaling: they are summed with their final weights, SPLIT_CHUNK
    splits a step (unrolled; the steps past `active` are skipped)."""
    offs_g = tl.arange(0, GROUP_P2)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_c = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    heads = kv_head * GROUP + offs_g
    mask_g = offs_g < GROUP
    first_row = (seq * NUM_HEADS + heads) * num_splits  # [GROUP_P2] each head's split 0

    rows = first_row[:, None] + offs_s[None, :]  # [GROUP_P2, SPLITS_P2]
    mask_gs = mask_g[:, None] & (offs_s < active)[None, :]
    # .cg: read through L2, where the other programs' stores are
    m = tl.load(m_ptr + rows, mask=mask_gs, other=float("-inf"), cache_modifier=".cg")
    sums = tl.load(m_ptr + num_rows + rows, mask=mask_gs, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 1)  # [GROUP_P2]
    # every split empty (padding rows): -inf -> 0, so each weight is exp2(-inf) = 0, never NaN
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.sum(tl.exp2(m - m_ref[:, None]) * sums, 1)  # [GROUP_P2]

    acc = tl.zeros([GROUP_P2, HEAD_DIM_PAD], dtype=tl.float32)
    for chunk in tl.static_range(0, SPLITS_P2, SPLIT_CHUNK):
        if chunk < active:
            chunk_rows = first_row[:, None] + chunk + offs_c[None, :]  # [GROUP_P2, SPLIT_CHUNK]
            mask_gc = mask_g[:, None] & (chunk + offs_c < active)[None, :]
            m_c = tl.load(
                m_ptr + chunk_rows, mask=mask_gc, other=float("-inf"), cache_modifier=".cg"
            )
            w = tl.exp2(m_c - m_ref[:, None])  # [GROUP_P2, SPLIT_CHUNK]; masked splits: 0
            if HEAD_DIM == HEAD_DIM_PAD:
                mask_gcd = mask_gc[:, :, None]
            else:  # the padding columns were never stored
                mask_gcd = mask_gc[:, :, None] & (offs_d < HEAD_DIM)[None, None, :]
            parts = tl.load(
                ws_ptr + chunk_rows[:, :, None] * HEAD_DIM_PAD + offs_d[None, None, :],
                mask=mask_gcd,
                other=0.0,
                cache_modifier=".cg",
            )  # [GROUP_P2, SPLIT_CHUNK, HEAD_DIM_PAD]
            acc += tl.sum(parts * w[:, :, None], 1)

    out = acc / tl.where(l_tot > 0.0, l_tot, 1.0)[:, None]
    tl.store(
        out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & (offs_d < HEAD_DIM)[None, :],
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
    key_cache, value_cache [num_blocks, block_size, num_kv_heads, head_dim], the same strides;
    block_tables [num_seqs, max_blocks_per_seq] int32; seq_lens [num_seqs] int32 (0 -> zeros).
    Returns (or fills `out`) [num_seqs, num_heads, head_dim] in query's dtype.

    config overrides the launch heuristic (tests, benchmark sweeps); workspace is an optional
    fp32 buffer of at least workspace_numel(...) elements for the partial results.
    Split launches on one device share its ticket counters: they must not run concurrently
    (on two streams at once).
    """
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    if cache_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(key_cache.shape)}")
    if query.stride(2) != 1 or key_cache.stride(3) != 1:
        raise ValueError("head_dim must be the contiguous (last) dimension")
    if value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride():
        raise ValueError("key_cache and value_cache must have the same shape and strides")
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
    group = num_heads // num_kv_heads
    head_dim_pad = dot_pad(head_dim)
    splits_p2 = next_pow2(splits)
    if splits == 1:
        workspace = counters = out  # unused by the kernel; any pointer will do
        split_chunk = 1
    else:
        numel = workspace_numel(num_seqs, num_heads, head_dim, splits)
        if workspace is None:
            workspace = torch.empty(numel, dtype=torch.float32, device=query.device)
        elif workspace.dtype != torch.float32 or workspace.numel() < numel:
            raise ValueError(f"workspace: need {numel} fp32 elements")
        counters = _ticket_counters(query.device, num_seqs * num_kv_heads)
        merge_elements = _MERGE_ELEMENTS_PER_THREAD * 32 * config.num_warps
        split_chunk = max(1, min(splits_p2, merge_elements // (next_pow2(group) * head_dim_pad)))
    pdl = use_pdl(query.device)
    _decode_kernel[(num_seqs, num_kv_heads, splits)](
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
        block_tables.shape[1],
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
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
        SPLIT=splits > 1,
        GROUP_P2=next_pow2(group),
        SPLITS_P2=splits_p2,
        SPLIT_CHUNK=split_chunk,
        DOT_PRECISION=dot_precision(key_cache.dtype),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out
