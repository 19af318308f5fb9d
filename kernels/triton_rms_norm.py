"""RMSNorm in Triton, with the residual add fused before it (see kernels.rms_norm, the reference).

One program per token row: the whole row [hidden] is one tile, so x (and residual) are read from
memory once and each output written once. That is the floor for this memory-bound op, against
the torch eager path's chain of elementwise kernels (add, upcast, square, mean, scale, cast,
weight product), each a pass over the row through memory.

Rounding follows the reference step by step: the add is an exact float32 sum rounded once to
x's dtype (as torch adds two half tensors), the statistics are float32, the normed row is
rounded to x's dtype before the product with the weight, and that product (float32) is rounded
to the output dtype. sqrt and the reciprocal are correctly rounded (IEEE), as on the CPU; only
the order of the sum of squares differs from torch.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import next_pow2
from kernels.triton_pdl import pdl_enter, use_pdl

# One tile per row: rows longer than this would need a loop over the row (no model here has a
# hidden size near it; Llama-3-405B has 16384).
MAX_HIDDEN = 32768


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden], unit last stride
    residual_ptr,  # [num_tokens, hidden], x's dtype (unread without HAS_RESIDUAL)
    weight_ptr,  # [hidden], contiguous
    out_ptr,  # [num_tokens, hidden], promote(weight, x) dtype
    residual_out_ptr,  # [num_tokens, hidden], x's dtype (unwritten without HAS_RESIDUAL)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # next_pow2(hidden)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    # Masked lanes load 0 and so add nothing to the sum of squares.
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(xf * xf, axis=0), hidden.to(tl.float32))
    inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    normed = (xf * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """t [..., hidden] as [num_tokens, hidden] with a unit last stride (a view where possible)."""
    t = t.reshape(-1, hidden)
    return t if t.stride(1) == 1 else t.contiguous()


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None,
    residual_out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight {tuple(weight.shape)} does not fit hidden size {hidden}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {hidden} > {MAX_HIDDEN} (one tile per row)")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must have x's shape and dtype")
    if out is None:
        out = torch.empty(
            x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device
        )
    if residual is not None and residual_out is None:
        residual_out = torch.empty_like(x)
    x2 = _rows(x, hidden)
    r2 = _rows(residual, hidden) if residual is not None else x2
    # Outputs must be viewable as rows without a copy: the kernel writes into them.
    out2 = out.view(-1, hidden)
    ro2 = residual_out.view(-1, hidden) if residual_out is not None else out2
    if x2.shape[0] == 0:
        return out, residual_out
    block = next_pow2(hidden)
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16
    pdl = use_pdl(x.device)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        r2,
        weight.contiguous(),
        out2,
        ro2,
        x2.stride(0),
        r2.stride(0),
        out2.stride(0),
        ro2.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out, residual_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x [..., hidden] (any leading strides, unit last stride preferred) times weight
    [hidden]. Returns (or fills `out`, contiguous, x's shape) promote(weight, x) dtype."""
    return _launch(x, None, weight, eps, out, None)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; x, residual [..., hidden], one dtype.
    `out` / `residual_out` (contiguous, x's shape) are filled when given; neither may alias an
    input."""
    out, residual_out = _launch(x, residual, weight, eps, out, residual_out)
    assert residual_out is not None  # allocated by _launch whenever residual is given
    return out, residual_out
