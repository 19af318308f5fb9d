"""The top-p floor in Triton (see kernels.top_p, the reference), one program a row, without a
sort and without the host: an inactive row's program stores -inf and exits, so a launch over
every row costs only its active ones (the sampler's rows that its top candidates did not
settle, a few in a hundred).

An active row bisects the order of float32 values (mapped onto int32 keys that sort as the
floats do) for the largest key k whose tokens at or above it hold the target mass, each probe
one pass over the row:

    lo = key(-inf)   mass(>= lo) = the row's total >= target
    hi = key(peak)+1 mass(>= hi) = 0 < target
    32 probes: mid = (lo + hi) / 2; mass(>= mid) >= target ? lo = mid : hi = mid

The mass only changes at the keys of the row's own logits, so lo ends on one of them: the
floor is that logit. The mass is summed in block order, where the reference sums it sorted:
the two can differ only where a prefix's mass lies within rounding of the target.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import next_pow2

_BLOCK = 1024


@triton.jit
def _key(x):
    """float32 -> int32 key, in the floats' order (x < y <=> key(x) < key(y), -0 below +0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _top_p_floor_kernel(
    x_ptr,  # [rows, n] float32, unit last stride
    peak_ptr,  # [rows] float32
    total_ptr,  # [rows] float32
    top_p_ptr,  # [rows] float32
    active_ptr,  # [rows] uint8
    out_ptr,  # [rows] float32
    stride_x,
    n,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(active_ptr + row) == 0:
        tl.store(out_ptr + row, float("-inf"))
        return
    peak = tl.load(peak_ptr + row)
    target = tl.load(top_p_ptr + row) * tl.load(total_ptr + row)
    lo = _key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)
    hi = _key(peak).to(tl.int64) + 1
    for _ in range(32):
        mid = lo + (hi - lo) // 2
        mass = tl.zeros((), tl.float32)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
            above = _key(x).to(tl.int64) >= mid
            mass += tl.sum(tl.where(above, tl.exp(x - peak), 0.0), axis=0)
        if mass >= target:
            lo = mid
        else:
            hi = mid
    bits = tl.where(lo >= 0, lo, lo ^ 0x7FFFFFFF).to(tl.int32)
    tl.store(out_ptr + row, bits.to(tl.float32, bitcast=True))


def top_p_floor(
    logits: torch.Tensor,
    peak: torch.Tensor,
    total: torch.Tensor,
    top_ps: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    rows, n = logits.shape
    logits = logits.float().contiguous()
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _top_p_floor_kernel[(rows,)](
        logits,
        peak.float().contiguous(),
        total.float().contiguous(),
        top_ps.float().contiguous(),
        active.to(torch.uint8).contiguous(),
        out,
        logits.stride(0),
        n,
        BLOCK=min(_BLOCK, next_pow2(n)),
    )
    return out
