"""Each row's maximum and the lowest column holding it: the greedy sampler's argmax over the
LM head's logits. The torch reference (the CPU path, and the ground truth for
kernels.triton_argmax).

    logits [rows, n] -> values [rows] float32, ids [rows] int64

Ties go to the lowest column, as torch.max(dim=-1) and torch.argmax document.
"""

import torch


def row_max_ref(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [rows, n] -> (each row's maximum [rows] float32, its lowest column [rows] int64)."""
    values, ids = logits.max(dim=-1)
    return values.float(), ids
