"""Launch helpers shared by the Triton kernels: SM count, padded sizes, dot precision.

Everything here is host-side arithmetic on shapes and device properties: nothing reads a device
tensor, so launches stay free of host syncs (and decode stays capturable in CUDA graphs).
"""

import functools

import torch

# What the CPU interpreter (TRITON_INTERPRET=1) pretends to have: small, so that tests on tiny
# shapes still exercise the split-K path of decode.
INTERPRETER_NUM_SMS = 4


@functools.cache
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of the card (a fixed stand-in for the CPU interpreter)."""
    if device.type != "cuda":
        return INTERPRETER_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_num_sms(index)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_pad(n: int) -> int:
    """A tl.dot operand dimension: a power of two, at least 16."""
    return max(16, next_pow2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not silently drop to tf32 (the references are exact fp32)."""
    return "ieee" if dtype == torch.float32 else "tf32"
