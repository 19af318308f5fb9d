"""Inputs for the rotary kernels' tests: random cos/sin caches and q, k as views of one merged
QKV projection output, as the model makes them; NaN-poisoned outputs (an unwritten element
shows)."""

import torch

MAX_POSITIONS = 4096


def rotary_caches(head_dim, device, seed):
    """Random float32 cos/sin caches [MAX_POSITIONS, head_dim] (full float32 mantissas, so the
    rounding to x's dtype matters), with halves that differ (a model's repeat: a kernel that read
    one half for both would pass on those)."""
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(MAX_POSITIONS, head_dim, generator=gen) * 2 - 1
    sin = torch.rand(MAX_POSITIONS, head_dim, generator=gen) * 2 - 1
    return cos.to(device), sin.to(device)


def qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed):
    """q, k as the model makes them: views of one merged QKV projection output [num_tokens,
    (num_heads + 2 * num_kv_heads) * head_dim], so their token stride is that row's length."""
    gen = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=gen) * 4
    q, k, _ = qkv.to(dtype).to(device).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)
    k = k.view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITIONS, (num_tokens,), generator=gen).to(device)
    return positions, q, k


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full(like.shape, float("nan"), dtype=like.dtype, device=like.device)
