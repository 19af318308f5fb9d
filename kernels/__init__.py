"""Kernels (attention, KV cache, norms, rotary): the one dispatch point the model layers call.

Each kernel has a plain-torch reference beside it. The references run everywhere (the CPU path,
and the ground truth for the Triton kernels' tests), but for paged attention, which on the CPU
runs kernels.cpu_paged_attention (the reference's paging around torch's fused SDPA); CUDA
tensors go to the Triton kernels:

    paged_attention   every sequence has one new token (num_tokens == num_seqs and
                      max_query_len == 1)  -> kernels.triton_decode_attention (split-K decode)
                      otherwise            -> kernels.triton_prefill_attention (prefill / extend,
                                              mixed batches)
    write_kv_cache    -> kernels.triton_kv_cache
    copy_blocks       -> kernels.triton_copy_blocks
    rms_norm, fused_add_rms_norm -> kernels.triton_rms_norm (reference: kernels.rms_norm)
    rotary            -> kernels.triton_rotary (reference: kernels.rotary)
    rotary_write_kv_cache -> kernels.triton_rotary_kv_cache (one launch; reference: rotary, then
                             write_kv_cache)
    silu_and_mul      -> kernels.triton_activation (reference: kernels.activation)
    shard_embedding   -> kernels.triton_embedding (a vocab-parallel embedding's lookup on one
                         rank, one launch; reference: kernels.embedding)
    row_max           -> kernels.triton_argmax (each row's max and lowest argmax, two launches;
                         reference: kernels.argmax)
    top_p_floor       -> kernels.triton_top_p (the smallest logit a top-p sampler keeps, one
                         launch, no host; reference: kernels.top_p)
    gemv, choose_gemv -> kernels.triton_gemv (one row times a weight; reference: F.linear), CUDA
                         only: a layer takes it where choose_gemv timed it faster than cuBLAS

Triton is imported lazily, on the first CUDA call: a CPU process never imports it (and the CPU
tests can turn on TRITON_INTERPRET before anything does).
"""

import functools
from types import SimpleNamespace

import torch

from kernels.activation import silu_and_mul_ref
from kernels.argmax import row_max_ref
from kernels.copy_blocks import copy_blocks_ref
from kernels.cpu_paged_attention import paged_attention_cpu
from kernels.embedding import shard_embedding_ref
from kernels.kv_cache import write_kv_cache_ref
from kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from kernels.rotary import rotary_ref
from kernels.top_p import top_p_floor_ref


@functools.cache
def _triton() -> SimpleNamespace:
    from kernels.triton_activation import silu_and_mul as silu_and_mul_triton
    from kernels.triton_argmax import row_max as row_max_triton
    from kernels.triton_copy_blocks import copy_blocks as copy_blocks_triton
    from kernels.triton_decode_attention import decode_attention
    from kernels.triton_embedding import shard_embedding as shard_embedding_triton
    from kernels.triton_gemv import choose as choose_gemv_triton
    from kernels.triton_gemv import gemv as gemv_triton
    from kernels.triton_kv_cache import write_kv_cache as write_kv_cache_triton
    from kernels.triton_prefill_attention import prefill_attention
    from kernels.triton_rms_norm import fused_add_rms_norm as fused_add_rms_norm_triton
    from kernels.triton_rms_norm import rms_norm as rms_norm_triton
    from kernels.triton_rotary import rotary as rotary_triton
    from kernels.triton_rotary_kv_cache import (
        rotary_write_kv_cache as rotary_write_kv_cache_triton,
    )
    from kernels.triton_top_p import top_p_floor as top_p_floor_triton

    return SimpleNamespace(
        decode_attention=decode_attention,
        prefill_attention=prefill_attention,
        write_kv_cache=write_kv_cache_triton,
        copy_blocks=copy_blocks_triton,
        rms_norm=rms_norm_triton,
        fused_add_rms_norm=fused_add_rms_norm_triton,
        rotary=rotary_triton,
        rotary_write_kv_cache=rotary_write_kv_cache_triton,
        silu_and_mul=silu_and_mul_triton,
        row_max=row_max_triton,
        top_p_floor=top_p_floor_triton,
        shard_embedding=shard_embedding_triton,
        gemv=gemv_triton,
        choose_gemv=choose_gemv_triton,
    )


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Stores this step's K/V [num_tokens, num_kv_heads, head_dim] at slot_mapping (-1 skips)."""
    if key_cache.is_cuda:
        _triton().write_kv_cache(key, value, key_cache, value_cache, slot_mapping)
    else:
        write_kv_cache_ref(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    one_token_context: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its paged context. Returns (or
    fills `out`, contiguous, the query's shape) [num_tokens, num_heads, head_dim].

    max_query_len / max_seq_len are host-side bounds of the batch (the caller knows them), so
    no kernel launch needs to read a device tensor back; one_token_context (the tokens the
    batch's one-token sequences attend, summed, host side) lets the prefill kernel give those
    sequences a launch of their own where that pays. On CUDA
    the decode kernel runs when every sequence has exactly one new token (then query row s is
    sequence s's token and query_start_loc is not read); its launch depends on shapes only, so
    it can be captured in a CUDA graph. max_seq_len is not needed by either kernel's grid.
    """
    if query.is_cuda:
        triton_ops = _triton()
        if query.shape[0] == seq_lens.shape[0] and max_query_len == 1:
            return triton_ops.decode_attention(
                query, key_cache, value_cache, block_tables, seq_lens, scale, out=out
            )
        return triton_ops.prefill_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            max_query_len=max_query_len,
            one_token_context=one_token_context,
            out=out,
        )
    result = paged_attention_cpu(
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale
    )
    return result if out is None else out.copy_(result)


def copy_blocks(
    key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor
) -> None:
    """Copies blocks (src, dst) = block_mapping[i] in every layer's K and V cache."""
    if key_caches and key_caches[0].is_cuda:
        _triton().copy_blocks(key_caches, value_caches, block_mapping)
    else:
        copy_blocks_ref(key_caches, value_caches, block_mapping)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of x [..., hidden] times weight [hidden] (see kernels.rms_norm)."""
    if x.is_cuda:
        return _triton().rms_norm(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the add in x's dtype, in one pass on CUDA."""
    if x.is_cuda:
        return _triton().fused_add_rms_norm(x, residual, weight, eps)
    return fused_add_rms_norm_ref(x, residual, weight, eps)


def rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding ("rotate half") of q [num_tokens, num_heads, head_dim] and k
    [num_tokens, num_kv_heads, head_dim] at positions [num_tokens] (int64), with the rows of
    cos_cache, sin_cache [max_positions, head_dim] (see kernels.rotary). Returns new (q, k);
    on CUDA one launch for both, bit-identical to the reference."""
    if q.is_cuda:
        return _triton().rotary(positions, q, k, cos_cache, sin_cache)
    return rotary_ref(positions, q, k, cos_cache, sin_cache)


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
) -> torch.Tensor:
    """rotary(positions, q, k, ...), then write_kv_cache of the rotated k and v at slot_mapping;
    returns the rotated q. On CUDA one launch for all of it, bit-identical to the two."""
    if q.is_cuda:
        return _triton().rotary_write_kv_cache(
            positions, q, k, v, cos_cache, sin_cache, key_cache, value_cache, slot_mapping
        )
    q, k = rotary_ref(positions, q, k, cos_cache, sin_cache)
    write_kv_cache_ref(k, v, key_cache, value_cache, slot_mapping)
    return q


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [..., 2 * d] = [gate | up] (see kernels.activation); one
    launch on CUDA."""
    if gate_up.is_cuda:
        return _triton().silu_and_mul(gate_up)
    return silu_and_mul_ref(gate_up)


def shard_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """ids [num_tokens] -> this rank's part of their embedding [num_tokens, hidden]: the row
    weight[id - start] of the ids in its shard, zeros for the others (see kernels.embedding);
    one launch on CUDA."""
    if weight.is_cuda:
        return _triton().shard_embedding(ids, weight, start)
    return shard_embedding_ref(ids, weight, start)


def row_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, n] -> (each row's maximum [rows] float32, the lowest column holding it
    [rows] int64), as torch.max(dim=-1) (see kernels.argmax); two short launches on CUDA."""
    if logits.is_cuda:
        return _triton().row_max(logits)
    return row_max_ref(logits)


def top_p_floor(
    logits: torch.Tensor,
    peak: torch.Tensor,
    total: torch.Tensor,
    top_ps: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    """logits [rows, n] float32 (peak, total, top_ps, active [rows]) -> each active row's top-p
    floor [rows] float32, -inf for the others (see kernels.top_p); on CUDA without a sort and
    without waiting for the device."""
    if logits.is_cuda:
        return _triton().top_p_floor(logits, peak, total, top_ps, active)
    return top_p_floor_ref(logits, peak, total, top_ps, active)


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple[int, int, int]
) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T + bias [N] by the Triton GEMV with config (CUDA tensors: a
    config comes from choose_gemv)."""
    return _triton().gemv(x, weight, bias, config)


def choose_gemv(weight: torch.Tensor) -> tuple[int, int, int] | None:
    """The Triton GEMV config faster than cuBLAS for one row times this CUDA weight, or None."""
    return _triton().choose_gemv(weight)


__all__ = [
    "choose_gemv",
    "copy_blocks",
    "fused_add_rms_norm",
    "gemv",
    "paged_attention",
    "rms_norm",
    "rotary",
    "rotary_write_kv_cache",
    "row_max",
    "shard_embedding",
    "silu_and_mul",
    "write_kv_cache",
]
