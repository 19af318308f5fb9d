"""Paged PREFILL / EXTEND attention in Triton: chunked prefill, prefix-cache hits, mixed batches.

Layout and semantics are those of kernels.paged_attention (the reference is the ground truth):
sequence s owns query rows query_start_loc[s] : query_start_loc[s + 1] (q_len of them), its
context after this step is seq_len = seq_lens[s] tokens (the new K/V already written to the
cache), and its query i sits at position ctx + i with ctx = seq_len - q_len, attending causally to
keys 0 .. ctx + i.

One program = one tile of BLOCK_Q consecutive query tokens of one sequence x the GROUP query
heads of one KV head, packed as BLOCK_M = BLOCK_Q * GROUP_PAD rows (row r: token r // GROUP_PAD,
head r % GROUP_PAD). Each K/V tile is then loaded once per group, and a sequence with one new
token (a decode in a mixed batch) still fills GROUP rows of the tile. Flash-attention loop:

    keys   0 ............................ full_end ...... diag_end       (seq_len)
           | tiles every row sees in full  | causal tiles  |
             no mask at all                  mask k <= q_pos

full_end = the tile boundary at or below ctx + m0 + 1 (the first row's position + 1) and
diag_end = min(seq_len, ctx + m0 + BLOCK_Q) (one past the last row's position), so only about
BLOCK_Q / BLOCK_N + 1 tiles per program pay for the mask.

Grid without a host sync: the tiles of sequence s are numbered from
first(s) = query_start_loc[s] // BLOCK_Q + s, which is enough room for ceil(q_len / BLOCK_Q)
tiles, so num_tokens // BLOCK_Q + num_seqs programs (per KV head) cover the batch; each program
binary-searches query_start_loc for its sequence and exits if its tile is past the end. The
tiles are launched in reverse so the longest (last, causal) ones start first.

Tile height by query length: the height is a launch constant, set by the batch's longest query,
and a sequence of one new token (a decode in a mixed step) fills only GROUP rows of its tile. So
when the batch's longest query needs a taller tile than one token does and the one-token
sequences read enough context between them (SPLIT_CONTEXT), prefill_attention launches twice:
the one-token sequences in tiles of the least height (16 rows), the longer ones in tiles of their
height; each launch's programs of the other kind exit at once (QUERY_LENS). The two launches run
one after the other, so with little decode context the prompts' launch alone leaves the card
part idle and one launch is faster.
"""

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.triton_launch import dot_pad, dot_precision, next_pow2

LOG2E = 1.4426950408889634
# Which sequences a launch attends (the kernel's QUERY_LENS): all, one-token ones, longer ones.
EVERY, ONE_TOKEN, LONGER = 0, 1, 2
# The one-token sequences get a launch of their own when the tokens they attend, summed, pass
# this: in kernels.benchmark's mixed sweep (H200, 32 heads / 8 KV heads) two launches are ahead
# from 128 decodes x 384 tokens (49k) and 32 x 2048 (66k), behind or even at 64 x 384 (25k) and
# 16 x 2048 (33k).
SPLIT_CONTEXT = 40_000


@dataclass(frozen=True)
class PrefillConfig:
    block_q: int  # query tokens per tile; BLOCK_M = block_q * group_pad rows
    block_n: int  # keys per K/V tile
    num_warps: int
    num_stages: int  # K/V tiles in flight + 1


@functools.cache
def prefill_config(
    max_query_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
) -> PrefillConfig:
    """Tiles of about 128 query rows (64 for fp32 or head_dim > 128) x 64 keys (32 for fp32),
    shrunk to the batch's longest query so a batch of short extends does not pad to 128 rows.
    num_stages 3 keeps two K/V tiles in flight (the block-table entries are prefetched by hand,
    so the K/V loads have no load of their own iteration in front of them)."""
    group_pad = next_pow2(num_heads // num_kv_heads)
    big = dtype.itemsize >= 4 or dot_pad(head_dim) > 128
    block_m = 64 if big else 128
    block_q = max(1, block_m // group_pad)
    block_q = min(block_q, next_pow2(max(1, max_query_len)))
    block_q = max(block_q, -(-16 // group_pad))  # BLOCK_M >= 16 for tl.dot
    q_tile_bytes = block_q * group_pad * dot_pad(head_dim) * dtype.itemsize
    return PrefillConfig(
        block_q=block_q,
        block_n=32 if big else 64,
        num_warps=8 if q_tile_bytes >= 32 * 1024 else 4,  # 8 once Q is 128 x 128 bf16
        num_stages=3,
    )


@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence s with first(s) = query_start_loc[s] // BLOCK_Q + s <= tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    q,  # [BLOCK_M, HEAD_DIM_PAD]
    m_i,  # [BLOCK_M] fp32, running max (log2 domain)
    l_i,  # [BLOCK_M] fp32, running sum of exp2
    acc,  # [BLOCK_M, HEAD_DIM_PAD] fp32
    page,  # [BLOCK_N] int64 block ids of the tile's keys (0 where masked)
    k_head,  # key cache pointer at this KV head
    v_head,
    key_start,
    key_end,  # keys >= key_end are masked (only when CAUSAL)
    q_pos,  # [BLOCK_M] query positions (only when CAUSAL)
    qk_scale,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    offs_d,
    mask_d,
    CAUSAL: tl.constexpr,  # False: every key of the tile is visible to every row
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    keys = key_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] context positions
    if CAUSAL:
        valid = keys < key_end
        kv_mask = valid[:, None] & mask_d[None, :]
    else:
        kv_mask = mask_d[None, :]
    slot_k = page * stride_kb + (keys % BLOCK_SIZE) * stride_kt
    slot_v = page * stride_vb + (keys % BLOCK_SIZE) * stride_vt
    if HEAD_DIM == HEAD_DIM_PAD and not CAUSAL:
        k = tl.load(k_head + slot_k[:, None] + offs_d[None, :])
    else:
        k = tl.load(k_head + slot_k[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, N]
    if CAUSAL:
        visible = (keys[None, :] <= q_pos[:, None]) & valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    # Every row has a finite m_i after the first tile processed (it holds key 0, which every row
    # sees), so a row fully masked in a later tile gets alpha = 1, p = 0: no NaN.
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if HEAD_DIM == HEAD_DIM_PAD and not CAUSAL:
        v = tl.load(v_head + slot_v[:, None] + offs_d[None, :])
    else:
        v = tl.load(v_head + slot_v[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# num_seqs varies step by step: unspecialised, one compiled variant serves every batch.
@triton.jit(do_not_specialize=["num_seqs"])
def _prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,  # next power of two of GROUP
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    QUERY_LENS: tl.constexpr,  # EVERY, ONE_TOKEN or LONGER
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # longest tiles first
    kv_head = tl.program_id(1)

    seq = _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    m0 = (tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query token of this tile
    if m0 >= q_len:
        return
    if QUERY_LENS == 1:  # ONE_TOKEN
        if q_len != 1:
            return
    if QUERY_LENS == 2:  # LONGER
        if q_len == 1:
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # cached tokens before this step's queries

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    token = m0 + offs_m // GROUP_PAD  # [BLOCK_M] query index within the sequence
    group = offs_m % GROUP_PAD
    heads = kv_head * GROUP + group
    row_valid = (token < q_len) & (group < GROUP)
    mask_d = offs_d < HEAD_DIM
    io_mask = row_valid[:, None] & mask_d[None, :]
    rows = (q_start + token).to(tl.int64)

    # [BLOCK_M, HEAD_DIM_PAD]; padding rows are 0 and never stored
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=io_mask,
        other=0.0,
    )
    q = q.to(k_cache_ptr.dtype.element_ty)
    q_pos = ctx + token  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    block_table = block_tables_ptr + seq * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh
    full_end = ((ctx + m0 + 1) // BLOCK_N) * BLOCK_N  # keys < full_end: visible to every row
    diag_end = tl.minimum(seq_len, ctx + m0 + BLOCK_Q)  # one past the last row's position

    # Block-table entries are loaded one tile ahead by hand (carried across both loops): the
    # K/V loads then depend on no load of their own iteration, and the software pipeliner keeps
    # num_stages - 1 K/V tiles in flight.
    offs_n = tl.arange(0, BLOCK_N)
    next_page = tl.load(block_table + offs_n // BLOCK_SIZE, mask=offs_n < diag_end, other=0)
    for key_start in range(0, full_end, BLOCK_N):
        page = next_page.to(tl.int64)
        ahead = key_start + BLOCK_N + offs_n
        next_page = tl.load(block_table + ahead // BLOCK_SIZE, mask=ahead < diag_end, other=0)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, page, k_head, v_head, key_start, diag_end, q_pos,
            qk_scale, stride_kb, stride_kt, stride_vb, stride_vt, offs_d, mask_d,
            False, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip
    for key_start in range(full_end, diag_end, BLOCK_N):
        page = next_page.to(tl.int64)
        ahead = key_start + BLOCK_N + offs_n
        next_page = tl.load(block_table + ahead // BLOCK_SIZE, mask=ahead < diag_end, other=0)
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, page, k_head, v_head, key_start, diag_end, q_pos,
            qk_scale, stride_kb, stride_kt, stride_vb, stride_vt, offs_d, mask_d,
            True, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, DOT_PRECISION,
        )  # fmt: skip

    out = acc / l_i[:, None]  # l_i > 0: every row sees key 0
    tl.store(
        out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=io_mask,
    )


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    one_token_context: int = 0,
    config: PrefillConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context (any q_len >= 0).

    query [num_tokens, num_heads, head_dim] (unit last stride); key_cache, value_cache
    [num_blocks, block_size, num_kv_heads, head_dim]; block_tables [num_seqs, max_blocks] int32;
    seq_lens [num_seqs] int32 (>= q_len); query_start_loc [num_seqs + 1] int32 (rows past
    query_start_loc[-1] are padding and left unwritten). max_query_len, a host-side bound of
    the sequences' q_len, picks the tile height; one_token_context, the seq_lens of the
    one-token sequences summed (host side), two launches past SPLIT_CONTEXT (the module's
    docstring). `config` forces one launch of its tiles over every sequence. Returns (or fills
    `out`) [num_tokens, num_heads, head_dim].
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if cache_head_dim != head_dim or num_heads % num_kv_heads != 0:
        raise ValueError(f"query {tuple(query.shape)} does not fit cache {tuple(key_cache.shape)}")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1:
        raise ValueError("head_dim must be the contiguous (last) dimension")
    if out is None:
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if config is not None:
        launches = [(config, EVERY)]
    else:
        shape = (num_heads, num_kv_heads, head_dim, key_cache.dtype)
        tall, short = prefill_config(max_query_len, *shape), prefill_config(1, *shape)
        if tall == short or one_token_context <= SPLIT_CONTEXT:
            launches = [(tall, EVERY)]
        else:
            launches = [(short, ONE_TOKEN), (tall, LONGER)]
    for launch_config, query_lens in launches:
        _launch(
            query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale, out,
            launch_config, query_lens,
        )  # fmt: skip
    return out


def _launch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    config: PrefillConfig,
    query_lens: int,
) -> None:
    """One launch of the kernel in `config`'s tiles over the sequences query_lens names."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_heads // num_kv_heads
    num_tiles = num_tokens // config.block_q + num_seqs
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        out,
        scale * LOG2E,
        num_seqs,
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
        GROUP=group,
        GROUP_PAD=next_pow2(group),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=dot_pad(head_dim),
        BLOCK_SIZE=block_size,
        BLOCK_Q=config.block_q,
        BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(key_cache.dtype),
        QUERY_LENS=query_lens,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
