"""The sum over tensor-parallel ranks of a row-parallel layer's output, the residual add and
RMSNorm after it, in one Triton kernel (the reference: all-reduce, then kernels.rms_norm's
fused_add_rms_norm_ref).

At a decode step's few rows the all-reduce is all latency (a row of 4096 bf16 is 8 KB) and the
norm after it another launch. Here each rank pushes its rows straight into every rank's copy of
a symmetric buffer (torch symmetric memory maps each peer's copy into this process: NVLink P2P)
and reads its own copy once every peer's rows are there, sums and norms: one launch, no NCCL
protocol, no flags and no fences. The data is its own signal (as the "Lamport" one-shot
all-reduces of TensorRT-LLM): an element that is still negative zero has not arrived. A rank
sends its values with every negative zero made positive (so the sum can differ from an
all-reduce's only in the sign of a zero), and a rank's copy holds nothing but
negative zeros between calls.

Every rank's copy of the buffer has the same layout (in elements of x's dtype):

    data   [2 parities][world][slot_elems]     slot [p][s] holds rank s's rows: [rows, hidden]

    epochs [max_rows] int32, this rank's own memory: calls that touched each row so far

One program per row (`epoch` = epochs[row] + 1, `p` = epoch & 1):
  1. push x[row], negative zeros made positive, into slot [p][rank] of every rank's copy, its
     own included;
  2. for each source rank in rank order, read slot [p][src]'s row of this rank's copy (volatile)
     until no element is negative zero, and add it in float32: the same sum, bit for bit, on
     every rank; rounded to x's dtype it is what an all-reduce of two bf16 addends gives (one
     rounding);
  3. put negative zeros back in the row's slots [p][*] of this rank's copy;
  4. the residual add and RMSNorm exactly as kernels.triton_rms_norm; epochs[row] = epoch.

Why two parities, and why the reset in 3 is safe: a rank that finished call e may push call
e+1 while a slower peer still reads call e's slots; e+1 writes the other parity. It cannot push
e+2 (e's parity) before that peer's reset of e: e+2 starts after its call e+1 has read the
peer's e+1 rows, which the peer pushes only in a later kernel than its call e (a kernel's
stores are visible once it has finished). Every rank must make the same calls with the same row
counts (as every collective); the copies start as negative zeros (fill_negative_zeros) and the
epochs zeroed.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_launch import next_pow2
from kernels.triton_pdl import pdl_enter, use_pdl
from kernels.triton_rms_norm import MAX_HIDDEN


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    x_ptr,  # [rows, hidden], unit last stride: this rank's partial sums
    residual_ptr,  # [rows, hidden], x's dtype
    weight_ptr,  # [hidden], contiguous
    out_ptr,  # [rows, hidden], promote(weight, x) dtype
    residual_out_ptr,  # [rows, hidden], x's dtype
    buffer_ptrs,  # [WORLD] int64: each rank's copy of the symmetric buffer, rank order
    epochs_ptr,  # [max_rows] int32
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    slot_elems,
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BITS: tl.constexpr,  # the integer type of x's width (tl.int16 or tl.int32)
    BLOCK: tl.constexpr,  # next_pow2(hidden)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    elem = x_ptr.dtype.element_ty
    # Negative zero: the sign bit alone, as an integer of x's width.
    empty = tl.full([BLOCK], 1, BITS) << (BITS.primitive_bitwidth - 1)
    epoch = tl.load(epochs_ptr + row) + 1
    parity = epoch & 1
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=mask, other=0.0)
    # 1. Push the row, negative zeros made positive, into slot [parity][RANK] of every copy.
    bits = x.to(BITS, bitcast=True)
    sent = tl.where(bits == empty, tl.zeros_like(bits), bits)
    slot_row = (parity * WORLD + RANK) * slot_elems + row * hidden
    for dst in tl.static_range(WORLD):
        base = tl.load(buffer_ptrs + dst).to(tl.pointer_type(BITS))
        tl.store(base + slot_row + offs, sent, mask=mask)
    # 2. Each source's row once no element of it is still negative zero, summed in rank order.
    own = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(BITS))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        src_row = own + (parity * WORLD + src) * slot_elems + row * hidden + offs
        part = tl.load(src_row, mask=mask, other=0, volatile=True)
        while tl.max((part == empty).to(tl.int32), axis=0) > 0:
            part = tl.load(src_row, mask=mask, other=0, volatile=True)
        acc += part.to(elem, bitcast=True).to(tl.float32)
    # 3. This rank's slots of the row back to negative zeros, for the parity's next call.
    tl.debug_barrier()
    for src in tl.static_range(WORLD):
        src_row = own + (parity * WORLD + src) * slot_elems + row * hidden + offs
        tl.store(src_row, empty, mask=mask)
    summed = acc.to(elem)
    # 4. The residual add and RMSNorm, rounded as kernels.triton_rms_norm rounds them.
    r = tl.load(residual_ptr + row.to(tl.int64) * stride_r + offs, mask=mask, other=0.0)
    h = (summed.to(tl.float32) + r.to(tl.float32)).to(elem)
    tl.store(residual_out_ptr + row.to(tl.int64) * stride_ro + offs, h, mask=mask)
    hf = h.to(tl.float32)
    mean_sq = tl.math.div_rn(tl.sum(hf * hf, axis=0), hidden.to(tl.float32))
    inv_rms = tl.math.div_rn(1.0, tl.sqrt_rn(mean_sq + eps))
    normed = (hf * inv_rms).to(elem).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = (w * normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * stride_o + offs, out, mask=mask)
    tl.store(epochs_ptr + row, epoch)


_BITS = {2: tl.int16, 4: tl.int32}  # element size in bytes -> the integer type of its bits


def buffer_bytes(world: int, slot_elems: int, dtype: torch.dtype) -> int:
    """Bytes of each rank's copy of the symmetric buffer (see the module's layout)."""
    return 2 * world * slot_elems * torch.tensor([], dtype=dtype).element_size()


def fill_negative_zeros(buffer: torch.Tensor, dtype: torch.dtype) -> None:
    """A copy of the buffer as it must be before the first call and between calls (bytes)."""
    buffer.view(dtype).fill_(-0.0)


def all_reduce_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    buffer_ptrs: torch.Tensor,
    epochs: torch.Tensor,
    rank: int,
    slot_elems: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual) for x, residual [rows,
    hidden] of one dtype (16 or 32 bits), on every rank at once. buffer_ptrs [world] int64 (the
    symmetric buffer's copies, rank order, each buffer_bytes(...) long, filled by
    fill_negative_zeros), epochs [max_rows] int32 (this rank's, zeroed with the buffers);
    rows * hidden <= slot_elems, rows <= max_rows."""
    rows, hidden = x.shape
    world = buffer_ptrs.numel()
    if x.element_size() not in _BITS:
        raise ValueError(f"x's dtype {x.dtype} is not 16 or 32 bits wide")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must have x's shape and dtype")
    if weight.shape != (hidden,) or hidden > MAX_HIDDEN:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit hidden size {hidden}")
    if rows > epochs.numel() or rows * hidden > slot_elems:
        raise ValueError(f"{rows} rows of {hidden} exceed the buffer's slots")
    if x.stride(1) != 1 or residual.stride(1) != 1:
        raise ValueError("x and residual need a unit last stride")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    residual_out = torch.empty_like(x)
    if rows == 0:
        return out, residual_out
    block = next_pow2(hidden)
    pdl = use_pdl(x.device)
    _all_reduce_add_rms_norm_kernel[(rows,)](
        x,
        residual,
        weight.contiguous(),
        out,
        residual_out,
        buffer_ptrs,
        epochs,
        x.stride(0),
        residual.stride(0),
        out.stride(0),
        residual_out.stride(0),
        hidden,
        slot_elems,
        eps,
        RANK=rank,
        WORLD=world,
        BITS=_BITS[x.element_size()],
        BLOCK=block,
        num_warps=4 if block < 2048 else 8 if block < 8192 else 16,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out, residual_out
