"""The sum over tensor-parallel ranks of a row-parallel layer's output, the residual add and
RMSNorm after it, in one Triton kernel (the reference: all-reduce, then kernels.rms_norm's
fused_add_rms_norm_ref).

At a decode step's few rows the all-reduce is all latency (a row of 4096 bf16 is 8 KB) and the
norm after it another launch. Here each rank pushes its rows straight into every rank's copy of
a symmetric buffer (torch symmetric memory maps each peer's copy into this process: NVLink P2P),
raises one flag per row on each of them, waits for its peers' flags, sums and norms: one launch
and one barrier per all-reduce, no NCCL protocol, no exit barrier.

Every rank's copy of the buffer has the same layout (offsets in elements of x's dtype, then in
int32 for the flags):

    data   [2 parities][world][slot_elems]     slot [p][s] holds rank s's rows: [rows, hidden]
    flags  [2 parities][world][max_rows]       flag [p][s][row] = the epoch rank s last pushed

    epochs [max_rows] int32, this rank's own memory: calls that touched each row so far

One program per row (`epoch` = epochs[row] + 1, `p` = epoch & 1):
  1. push x[row] into slot [p][rank] of every rank's buffer, its own included;
  2. CTA barrier, then a release store (system scope) of epoch into flag [p][rank][row] of
     every rank;
  3. for each source rank, spin on this rank's flag [p][src][row] (acquire, system scope)
     until it equals epoch;
  4. sum the slots in rank order in float32: the same sum, bit for bit, on every rank; rounded
     to x's dtype it is what an all-reduce of two bf16 addends gives (one rounding);
  5. the residual add and RMSNorm exactly as kernels.triton_rms_norm; epochs[row] = epoch.

Why two parities: a rank that finished call e may push call e+1 while a slower peer still
reads call e's slots; e+1 writes the other parity. It cannot reach e+2 (e's parity) first: e+1
waits for the peer's e+1 flag, stored only after the peer finished e. Flags are compared for
equality, never reset, so they stay valid through the int32 epoch's wrap-around; every rank
must make the same calls with the same row counts (as every collective), and the buffer,
flags and epochs start zeroed.
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
    max_rows,
    flags_at,  # bytes from a buffer's start to its flags
    eps,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,  # next_pow2(hidden)
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    elem = x_ptr.dtype.element_ty
    epoch = tl.load(epochs_ptr + row) + 1
    parity = epoch & 1
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=mask, other=0.0)
    # 1. Push the row into slot [parity][RANK] of every rank's buffer.
    slot_row = (parity * WORLD + RANK) * slot_elems + row * hidden
    for dst in tl.static_range(WORLD):
        base = tl.load(buffer_ptrs + dst)
        tl.store(base.to(tl.pointer_type(elem)) + slot_row + offs, x, mask=mask)
    # 2. Every thread's pushes issued, then the flags, released at system scope.
    tl.debug_barrier()
    flag = (parity * WORLD + RANK) * max_rows + row
    for dst in tl.static_range(WORLD):
        base = tl.load(buffer_ptrs + dst)
        flags = (base + flags_at).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + flag, epoch, sem="release", scope="sys")
    # 3. Wait for every source's flag in this rank's own buffer.
    own = tl.load(buffer_ptrs + RANK)
    own_flags = (own + flags_at).to(tl.pointer_type(tl.int32))
    own_data = own.to(tl.pointer_type(elem))
    for src in tl.static_range(WORLD):
        src_flag = own_flags + (parity * WORLD + src) * max_rows + row
        seen = tl.atomic_cas(src_flag, epoch, epoch, sem="acquire", scope="sys")
        while seen != epoch:
            seen = tl.atomic_cas(src_flag, epoch, epoch, sem="acquire", scope="sys")
    tl.debug_barrier()
    # 4. The sum in rank order, float32, one rounding.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for src in tl.static_range(WORLD):
        src_row = (parity * WORLD + src) * slot_elems + row * hidden
        part = tl.load(own_data + src_row + offs, mask=mask, other=0.0, volatile=True)
        acc += part.to(tl.float32)
    summed = acc.to(elem)
    # 5. The residual add and RMSNorm, rounded as kernels.triton_rms_norm rounds them.
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


def flags_offset(world: int, slot_elems: int, dtype: torch.dtype) -> int:
    """Bytes from the start of a rank's copy of the symmetric buffer to its flags."""
    return 2 * world * slot_elems * torch.tensor([], dtype=dtype).element_size()


def buffer_bytes(world: int, slot_elems: int, max_rows: int, dtype: torch.dtype) -> int:
    """Bytes of each rank's copy of the symmetric buffer: data, then flags (see the module)."""
    return flags_offset(world, slot_elems, dtype) + 2 * world * max_rows * 4


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
    max_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum_ranks(x) + residual), sum_ranks(x) + residual) for x, residual [rows,
    hidden] of one dtype, on every rank at once. buffer_ptrs [world] int64 (the symmetric
    buffer's copies, rank order, each buffer_bytes(...) long), epochs [max_rows] int32 (this
    rank's, zeroed with the buffers); rows * hidden <= slot_elems, rows <= max_rows."""
    rows, hidden = x.shape
    world = buffer_ptrs.numel()
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError("residual must have x's shape and dtype")
    if weight.shape != (hidden,) or hidden > MAX_HIDDEN:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit hidden size {hidden}")
    if rows > max_rows or rows * hidden > slot_elems:
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
        max_rows,
        flags_offset(world, slot_elems, x.dtype),
        eps,
        RANK=rank,
        WORLD=world,
        BLOCK=block,
        num_warps=4 if block < 2048 else 8 if block < 8192 else 16,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return out, residual_out
