"""Triton KV-cache write against the torch reference (CPU interpreter or GPU)."""

import pytest
import torch

from kernels.kv_cache import write_kv_cache_ref


def _poisoned_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return (
        torch.full(shape, float("nan"), dtype=dtype, device=device),
        torch.full(shape, float("nan"), dtype=dtype, device=device),
    )


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 16), (3, 24), (8, 64)])
def test_write_kv_cache_matches_reference(device, block_size, num_kv_heads, head_dim):
    from kernels.triton_kv_cache import write_kv_cache

    gen = torch.Generator().manual_seed(block_size * num_kv_heads)
    num_blocks, num_tokens = 6, 13
    # Distinct slots, some padding (-1), including the cache's first and last slot.
    last = num_blocks * block_size - 1
    inner = torch.randperm(last - 1, generator=gen)[: num_tokens - 2] + 1
    slots = torch.cat([torch.tensor([0, last]), inner])
    slots[[4, 9]] = -1
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    got_k, got_v = _poisoned_cache(*shape, torch.float32, device)
    exp_k, exp_v = got_k.clone(), got_v.clone()
    write_kv_cache(key.to(device), value.to(device), got_k, got_v, slots.to(device))
    write_kv_cache_ref(key.to(device), value.to(device), exp_k, exp_v, slots.to(device))
    torch.testing.assert_close(got_k, exp_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got_v, exp_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16])
def test_write_kv_cache_strided_views_and_cast(device, cache_dtype):
    """K and V as views of one fused qkv projection (row stride > num_kv_heads * head_dim),
    int32 slots, written into a half-precision cache."""
    from kernels.triton_kv_cache import write_kv_cache

    num_tokens, num_heads, num_kv_heads, head_dim, block_size = 9, 4, 2, 16, 8
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=device)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    key = qkv[:, q_size : q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, q_size + kv_size :].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([3, 4, 5, -1, 8, 31, 0, -1, 17], dtype=torch.int32, device=device)
    got_k, got_v = _poisoned_cache(4, block_size, num_kv_heads, head_dim, cache_dtype, device)
    exp_k, exp_v = got_k.clone(), got_v.clone()
    write_kv_cache(key, value, got_k, got_v, slots)
    write_kv_cache_ref(key, value, exp_k, exp_v, slots.long())
    # The GPU rounds to nearest like torch; Triton's CPU interpreter truncates to bf16.
    rtol = 2**-7 if cache_dtype == torch.bfloat16 and device.type != "cuda" else 0
    torch.testing.assert_close(got_k, exp_k, rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(got_v, exp_v, rtol=rtol, atol=0, equal_nan=True)


@pytest.mark.gpu
def test_write_kv_cache_gpu_dispatch_realistic():
    import kernels

    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 4096, 8, 128, 16, 1024
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    slots[::7] = -1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    got_k = torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    got_v = torch.zeros_like(got_k)
    exp_k, exp_v = got_k.clone(), got_v.clone()
    kernels.write_kv_cache(key, value, got_k, got_v, slots)
    write_kv_cache_ref(key, value, exp_k, exp_v, slots)
    assert torch.equal(got_k, exp_k) and torch.equal(got_v, exp_v)
