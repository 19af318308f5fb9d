"""Rotary position embedding, "rotate half" layout: the torch reference (the CPU path, and the
ground truth for kernels.triton_rotary).

The arithmetic is HF transformers' apply_rotary_pos_emb, operation for operation, so that the
float32 CPU path stays token-identical to HF:

    cos, sin = cos_cache[positions], sin_cache[positions]   float32 rows, cast to x's dtype
    out      = x * cos + rotate_half(x) * sin               each product, then the sum, rounded
                                                            to x's dtype (one torch op each)
    rotate_half(x) = cat(-x[..., half:], x[..., :half])     half = head_dim / 2

for x = q and x = k, every head of a token sharing its position's row.
"""

import torch


def rotary_ref(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [num_tokens] (in [0, max_positions)); q [num_tokens, num_heads, head_dim];
    k [num_tokens, num_kv_heads, head_dim]; cos_cache, sin_cache [max_positions, head_dim].
    Returns new (q_out, k_out), contiguous, q's and k's shapes, q's dtype."""
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)  # [num_tokens, 1, head_dim]
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
