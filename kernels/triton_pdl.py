"""Programmatic dependent launch (PDL, sm_90 and later) for the decode path's Triton kernels.

A decode step is a chain of small kernels (some nine a layer); inside a CUDA graph each still
waits for the one before it to drain before it is even scheduled. With PDL a kernel is launched
with the launch_pdl attribute and starts as soon as every program of the kernel before it has
started and called gdc_launch_dependents; it then blocks in gdc_wait until that kernel has
finished and its memory is visible. The launch and the programs' start overlap the tail of the
kernel before; nothing of the data flow changes.

Each kernel that opts in calls pdl_enter(PDL) first thing, before it reads or writes any
memory another kernel touches; kernels that do not opt in (cuBLAS, torch, NCCL) are launched
as before and wait for full completion as always.
"""

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def use_pdl(device: torch.device) -> bool:
    """Whether kernels on device launch with PDL: a CUDA card of compute capability 9.0 or later
    (never under the CPU interpreter), unless PAGEDSERVE_PDL=0 (to measure without it)."""
    if device.type != "cuda" or os.environ.get("PAGEDSERVE_PDL", "1") == "0":
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Let the next kernel launch, then wait for the previous one's memory (with PDL only)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
