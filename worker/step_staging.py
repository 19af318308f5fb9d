"""A step's integer inputs moved to the device in one copy: packed into a pinned host buffer,
copied, and handed out as views of the device copy.

    buffer (int64)  [ int64 array 0 | pad | int64 array 1 | pad | ... | int32 region ... ]
    int32 region    [ int32 array 0 | pad | int32 array 1 | pad | ... ]

Every array starts 16-byte aligned: Triton specialises a pointer argument on its alignment to
16 bytes, so a view whose alignment varied step by step (with the length of the array before
it) would compile another variant of a kernel mid-serving.

Two host buffers alternate: a step's buffer is rewritten two steps later, after the step between
has finished (the worker finishes step N before it launches N + 2), so its copy has completed.
A buffer grows (a new one, at least doubled) when a step needs more; the old one is freed only
once its copy is done (PyTorch's pinned allocator waits for the copies it recorded). On the CPU
the buffer is the device's: the views are of it, with no copy.
"""

import numpy as np
import torch


class StepStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)] * 2
        self._num_steps = 0

    def to_device(
        self, int64: list[np.ndarray], int32: list[np.ndarray]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The arrays on the device (int64 ones as int64, int32 ones as int32, any shape):
        views of one buffer, valid until the step two steps later is staged."""
        sizes64 = [-(-a.size // 2) * 2 for a in int64]  # padded: each start 16-byte aligned
        starts64 = np.cumsum([0] + sizes64)
        at32 = int(starts64[-1])  # where the int32 region starts
        sizes32 = [-(-a.size // 4) * 4 for a in int32]  # padded: each start 16-byte aligned
        starts32 = np.cumsum([0] + sizes32)
        total = at32 + int(starts32[-1]) // 2
        which = self._num_steps % 2
        self._num_steps += 1
        if len(self._buffers[which]) < total:
            size = max(total, 2 * len(self._buffers[which]))
            pin = self.device.type == "cuda"
            self._buffers[which] = torch.empty(size, dtype=torch.int64, pin_memory=pin)
        host = self._buffers[which]
        host64, host32 = host.numpy(), host[at32:].view(torch.int32).numpy()
        for a, start in zip(int64, starts64, strict=False):
            host64[start : start + a.size] = a.ravel()
        for a, start in zip(int32, starts32, strict=False):
            host32[start : start + a.size] = a.ravel()
        device = host[:total].to(self.device, non_blocking=True)
        device32 = device[at32:].view(torch.int32)
        return (
            [device[s : s + a.size].view(a.shape) for a, s in zip(int64, starts64, strict=False)],
            [device32[s : s + a.size].view(a.shape) for a, s in zip(int32, starts32, strict=False)],
        )


def to_device_async(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """host's copy on device, queued on the current stream without waiting for it. A blocking
    host-to-device copy synchronizes the stream: the host would wait for every step queued
    before it, and a step launched ahead would overlap nothing. From pageable memory the copy
    returns once the driver has staged the bytes, so host may be dropped at once."""
    return host.to(device, non_blocking=True)
