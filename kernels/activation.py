"""SiLU-and-multiply, the gated MLP's activation (Llama's SwiGLU): the torch reference (the CPU
path, and the ground truth for kernels.triton_activation).

    gate_up [num_tokens, 2 * intermediate]  = [ gate | up ]   (the merged projection's output)
    out     [num_tokens, intermediate]      = silu(gate) * up

Each op rounds to x's dtype, as HF's `act_fn(gate_proj(x)) * up_proj(x)` does: silu is computed
in float32 and rounded, then the product of two x-dtype values is rounded.
"""

import torch
import torch.nn.functional as F


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2 * d] -> silu(gate_up[..., :d]) * gate_up[..., d:], [..., d]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
