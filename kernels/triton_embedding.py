"""A vocab-parallel embedding's lookup in one launch (see kernels.embedding, the reference):
the torch version takes seven small kernels (offset, two compares, or, fill, gather, fill), each
bound by its launch at decode's few tokens.

Grid: (num_tokens, cdiv(hidden, BLOCK)); each program reads its token's id, and copies BLOCK
values of that row of this rank's shard, or writes zeros when the id is another rank's.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv, next_pow2
from kernels.triton_pdl import pdl_enter, use_pdl

_BLOCK = 1024


@triton.jit
def _shard_embedding_kernel(
    ids_ptr,  # [num_tokens] int64
    weight_ptr,  # [shard, hidden], unit last stride
    out_ptr,  # [num_tokens, hidden], contiguous
    stride_w,
    start,
    shard,
    hidden,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    local = tl.load(ids_ptr + token) - start
    mine = (local >= 0) & (local < shard)
    row = tl.where(mine, local, 0)
    mask = offs < hidden
    x = tl.load(weight_ptr + row * stride_w + offs, mask=mask, other=0.0)  # row 0 if not mine
    tl.store(out_ptr + token * hidden + offs, tl.where(mine, x, tl.zeros_like(x)), mask=mask)


def shard_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """ids [num_tokens] int64 -> weight[id - start], or zeros for the ids outside this rank's
    rows start .. start + shard - 1: [num_tokens, hidden] in weight's dtype."""
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    shard, hidden = weight.shape
    out = torch.empty(ids.shape[0], hidden, dtype=weight.dtype, device=weight.device)
    if ids.shape[0] == 0:
        return out
    block = min(_BLOCK, next_pow2(hidden))
    pdl = use_pdl(weight.device)
    _shard_embedding_kernel[(ids.shape[0], cdiv(hidden, block))](
        ids,
        weight,
        out,
        weight.stride(0),
        start,
        shard,
        hidden,
        BLOCK=block,
        num_warps=4,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out
