"""SiLU-and-multiply in Triton: one pass over the merged gate/up projection's output (see
kernels.activation, the reference). The eager torch path takes two kernels and a round trip of
silu(gate) through memory; at decode's small batches each is launch-bound, so one launch is
what counts.

Grid: (num_tokens, cdiv(d, BLOCK)); each program reads BLOCK gate and BLOCK up values of its row
and writes BLOCK outputs. Rounding follows the reference: silu in float32, rounded to x's dtype,
then the product in float32, rounded once more.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import cdiv, next_pow2
from kernels.triton_pdl import pdl_enter, use_pdl

_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [num_tokens, 2 * d], unit last stride
    out_ptr,  # [num_tokens, d], unit last stride
    stride_in,
    stride_out,
    d,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < d
    gate = tl.load(gate_up_ptr + row * stride_in + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + d + offs, mask=mask, other=0.0)
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up [..., 2 * d] -> silu(gate) * up [..., d] in gate_up's dtype (fills `out`,
    contiguous, when given)."""
    width = gate_up.shape[-1]
    if width % 2:
        raise ValueError(f"silu_and_mul: last dimension {width} is not even (gate | up)")
    d = width // 2
    rows = gate_up.reshape(-1, width)
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    if out is None:
        out = torch.empty((*gate_up.shape[:-1], d), dtype=gate_up.dtype, device=gate_up.device)
    out_rows = out.view(-1, d)
    if rows.shape[0] == 0:
        return out
    block = min(_BLOCK, next_pow2(d))
    pdl = use_pdl(gate_up.device)
    _silu_and_mul_kernel[(rows.shape[0], cdiv(d, block))](
        rows,
        out_rows,
        rows.stride(0),
        out_rows.stride(0),
        d,
        BLOCK=block,
        num_warps=4,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out
