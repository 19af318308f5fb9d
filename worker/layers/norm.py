import torch
from torch import nn

import kernels
from worker import distributed


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 as HF transformers does (the
    float32 upcast covers the statistics; the normed row is cast back to x's dtype before the
    product with w). Optionally fused with the residual add before it.

    On CUDA one Triton kernel per call (kernels.triton_rms_norm); on the CPU the torch reference
    (kernels.rms_norm), the same operations as HF's LlamaRMSNorm.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, sum_ranks: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x [num_tokens, hidden] -> norm(x); with residual (x's shape and dtype):
        (norm(x + residual), x + residual), the add rounded to x's dtype, as `x + residual`.
        sum_ranks: x is this rank's part of a row-parallel layer's output; its sum over the
        tensor-parallel ranks is taken first (in one kernel with the add and norm where it can:
        distributed.all_reduce_add_rms_norm)."""
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        if sum_ranks:
            return distributed.all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
