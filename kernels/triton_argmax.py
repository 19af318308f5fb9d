"""Each row's maximum and its lowest column in Triton (see kernels.argmax, the reference), in
two launches. torch's max(dim=-1) reduces a row in one block of threads: the LM head's one row
of 64k-128k logits at batch 1 takes it tens of microseconds, bound by latency. Here programs
split the row, then one program a row combines their bests:

    logits [rows, n]
      stage 1, grid (rows, chunks): each CHUNK columns -> their best value and its lowest column
        partial_values [rows, chunks] float32, partial_ids [rows, chunks] int32
      stage 2, grid (rows,): the best of a row's partials, ties to the lowest column
        values [rows] float32, ids [rows] int64

Values are compared in float32 (exact for bf16, fp16 and float32 logits), so the maximum and
its column are those of torch.max on any input without NaN.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv, next_pow2
from kernels.triton_pdl import pdl_enter, use_pdl

_CHUNK = 1024


@triton.jit
def _chunk_max_kernel(
    x_ptr,  # [rows, n], unit last stride
    values_ptr,  # [rows, chunks] float32
    ids_ptr,  # [rows, chunks] int32
    stride_x,
    n,
    chunks,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    x = x.to(tl.float32)
    best = tl.max(x, axis=0)
    # Every chunk holds at least one column below n, so `best` is one of its values.
    first = tl.min(tl.where((x == best) & (cols < n), cols, n), axis=0)
    tl.store(values_ptr + row * chunks + chunk, best)
    tl.store(ids_ptr + row * chunks + chunk, first)


@triton.jit
def _combine_kernel(
    values_ptr,  # [rows, chunks] float32
    ids_ptr,  # [rows, chunks] int32
    out_values_ptr,  # [rows] float32
    out_ids_ptr,  # [rows] int64
    n,
    chunks,
    BLOCK: tl.constexpr,  # >= chunks
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < chunks
    values = tl.load(values_ptr + row * chunks + offs, mask=mask, other=float("-inf"))
    ids = tl.load(ids_ptr + row * chunks + offs, mask=mask, other=n)
    best = tl.max(values, axis=0)
    first = tl.min(tl.where((values == best) & mask, ids, n), axis=0)
    tl.store(out_values_ptr + row, best)
    tl.store(out_ids_ptr + row, first.to(tl.int64))


def row_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, n] (unit last stride) -> (each row's maximum [rows] float32, its lowest
    column [rows] int64). Launches depend on shapes only: capturable in a CUDA graph."""
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"row_max: logits must be [rows, n] with n > 0, got {tuple(logits.shape)}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, n = logits.shape
    device = logits.device
    values = torch.empty(rows, dtype=torch.float32, device=device)
    ids = torch.empty(rows, dtype=torch.int64, device=device)
    if rows == 0:
        return values, ids
    chunk = min(_CHUNK, next_pow2(n))
    chunks = cdiv(n, chunk)
    partial_values = torch.empty(rows, chunks, dtype=torch.float32, device=device)
    partial_ids = torch.empty(rows, chunks, dtype=torch.int32, device=device)
    pdl = use_pdl(device)
    _chunk_max_kernel[(rows, chunks)](
        logits,
        partial_values,
        partial_ids,
        logits.stride(0),
        n,
        chunks,
        CHUNK=chunk,
        num_warps=4,
        PDL=pdl,
        launch_pdl=pdl,
    )
    _combine_kernel[(rows,)](
        partial_values,
        partial_ids,
        values,
        ids,
        n,
        chunks,
        BLOCK=next_pow2(chunks),
        num_warps=4,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return values, ids
