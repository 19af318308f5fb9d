"""RMSNorm, and the residual add fused before it: the torch reference (the CPU path, and the ground
truth for kernels.triton_rms_norm).

The arithmetic is HF transformers' LlamaRMSNorm, operation for operation, so that the float32 CPU
path stays token-identical to HF:

    residual_out = x + residual                        in x's dtype (the residual stream's)
    normed       = float32(residual_out) * rsqrt(mean(float32(residual_out)^2) + eps)
    out          = weight * normed.to(x's dtype)       dtype: promote(weight, x)

The float32 upcast covers the mean and the scaling only; the product with the weight is taken
after the cast back to x's dtype, as HF does.
"""

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., hidden], weight [hidden] -> [..., hidden] in promote(weight, x) dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the normed input of the next sublayer and the new
    residual stream. x, residual [..., hidden] of one dtype."""
    residual_out = x + residual
    return rms_norm_ref(residual_out, weight, eps), residual_out
