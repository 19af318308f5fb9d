"""The top-p floor of each row: the smallest logit a top-p sampler keeps. The torch reference
(the CPU path, and the ground truth for kernels.triton_top_p).

    logits [rows, n] float32, peak [rows] (each row's maximum), total [rows] (its
    sum of exp(logit - peak)), top_ps [rows], active [rows] bool  ->  floor [rows] float32

An active row's floor is the largest of its logits t whose tokens at or above it hold top_p of
the row's mass: sum over x >= t of exp(x - peak) >= top_p * total. Keeping every logit >= floor
keeps the shortest run of the row's tokens in descending order that reaches top_p (and any
token tied with the last of them). Inactive rows get -inf (every token kept).
"""

import torch


def top_p_floor_ref(
    logits: torch.Tensor,
    peak: torch.Tensor,
    total: torch.Tensor,
    top_ps: torch.Tensor,
    active: torch.Tensor,
) -> torch.Tensor:
    floor = torch.full_like(peak, float("-inf"))
    rows = torch.nonzero(active).squeeze(-1)
    if len(rows) == 0:
        return floor
    ordered = logits[rows].sort(dim=-1, descending=True).values  # [active rows, n]
    mass = torch.exp(ordered - peak[rows, None]).cumsum(dim=-1)
    # The first position whose running mass reaches the target (the last if rounding keeps the
    # whole row's sum below it).
    first = (mass < (top_ps[rows] * total[rows])[:, None]).sum(dim=-1)
    first = first.clamp(max=ordered.shape[-1] - 1)
    floor[rows] = ordered.gather(-1, first[:, None]).squeeze(-1)
    return floor
