"""The fused rotary + KV-cache write (Triton, CPU interpreter or GPU) against its reference: the
torch rotary, then the torch cache write.

Exact comparisons (torch.equal, NaN-poisoned outputs so that an unwritten element fails and a
written padding slot shows): the kernel's arithmetic is the rotary kernel's (see
test_rotary.py for why it is bit-exact); bf16 runs on the GPU only (the interpreter rounds
float32 to bf16 wrongly).
"""

import pytest
import torch

from kernels.kv_cache import write_kv_cache_ref
from kernels.rotary import rotary_ref
from tests.kernels.rotary_inputs import MAX_POSITIONS, poisoned, qkv_views, rotary_caches

NUM_BLOCKS = 12


def _qkv(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed):
    """positions, q, k as views of a merged QKV output (see test_rotary), and v likewise."""
    positions, q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed)
    v = (k * 3 - 1).clone()  # not k: a kernel that stored k for v fails
    return positions, q, k, v


def _slots(num_tokens, block_size, seed, device):
    """Distinct slots over the whole cache (its last slot first, then slot 0), every third
    token padding."""
    gen = torch.Generator().manual_seed(seed)
    last = NUM_BLOCKS * block_size - 1
    slots = torch.randperm(last - 1, generator=gen)[:num_tokens] + 1
    slots[0] = last
    slots[1:2] = 0
    slots[2::3] = -1
    return slots.to(device)


def _check(positions, q, k, v, cos, sin, block_size, slots, cache_dtype):
    from kernels.triton_rotary_kv_cache import rotary_write_kv_cache

    shape = (NUM_BLOCKS, block_size, k.shape[1], k.shape[2])
    key_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=q.device)
    value_cache = torch.full(shape, float("nan"), dtype=cache_dtype, device=q.device)
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    q_before, k_before, v_before = q.clone(), k.clone(), v.clone()
    q_out = poisoned(q)
    got_q = rotary_write_kv_cache(
        positions, q, k, v, cos, sin, key_cache, value_cache, slots, q_out=q_out
    )
    expected_q, rotated_k = rotary_ref(positions, q, k, cos, sin)
    write_kv_cache_ref(rotated_k, v, expected_keys, expected_values, slots)
    assert got_q.data_ptr() == q_out.data_ptr()
    assert torch.equal(got_q, expected_q)
    torch.testing.assert_close(key_cache, expected_keys, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(value_cache, expected_values, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q, q_before) and torch.equal(k, k_before) and torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_tokens", [1, 5, 17])
def test_rotary_kv_cache_matches_reference(device, dtype, block_size, heads, num_tokens):
    """Ragged token counts, GQA ratios 1, 4 and 8, three block sizes, padding slots."""
    num_heads, num_kv_heads = heads
    seed = num_tokens + 10 * num_heads + 100 * num_kv_heads + block_size
    positions, q, k, v = _qkv(num_tokens, num_heads, num_kv_heads, 64, dtype, device, seed)
    slots = _slots(num_tokens, block_size, seed, device)
    _check(positions, q, k, v, *rotary_caches(64, device, seed), block_size, slots, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_kv_cache_other_shapes(device, dtype):
    """head_dim 96 (padded tiles), more KV heads than one block holds (48 q and 24 KV heads of
    128: several partial blocks), int32 slots, contiguous inputs, and a cast into a float32
    cache from a half-precision step."""
    positions, q, k, v = _qkv(7, 6, 2, 96, dtype, device, seed=1)
    slots = _slots(7, 16, 1, device).to(torch.int32)
    _check(positions, q, k, v, *rotary_caches(96, device, seed=1), 16, slots, dtype)
    positions, q, k, v = _qkv(3, 48, 24, 128, dtype, device, seed=2)
    cos, sin = rotary_caches(128, device, seed=2)
    slots = _slots(3, 8, 2, device)
    _check(positions, q.contiguous(), k.contiguous(), v, cos, sin, 8, slots, torch.float32)


def test_rotary_kv_cache_empty_batch_and_bad_shapes(device):
    from kernels.triton_rotary_kv_cache import rotary_write_kv_cache

    cos, sin = rotary_caches(64, device, seed=0)
    cache = torch.zeros(NUM_BLOCKS, 16, 2, 64, device=device)
    positions, q, k, v = _qkv(0, 4, 2, 64, torch.float32, device, seed=0)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    got = rotary_write_kv_cache(positions, q, k, v, cos, sin, cache, cache.clone(), empty)
    assert got.shape == (0, 4, 64) and not cache.any()
    positions, q, k, v = _qkv(3, 4, 2, 64, torch.float32, device, seed=0)
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="do not fit cache"):
        rotary_write_kv_cache(positions, q, k, v[:, :1], cos, sin, cache, cache.clone(), slots)
    with pytest.raises(ValueError, match="do not fit cache"):
        wrong = torch.zeros(NUM_BLOCKS, 16, 4, 64, device=device)
        rotary_write_kv_cache(positions, q, k, v, cos, sin, wrong, wrong.clone(), slots)
    with pytest.raises(ValueError, match="slots"):
        rotary_write_kv_cache(positions, q, k, v, cos, sin, cache, cache.clone(), slots[:2])


def test_layer_dispatch_cpu_is_rotary_then_write():
    """worker.layers.rotary on the CPU: rotate_and_write_kv is the plain rotation, then the plain
    cache write (the CPU path of the served model)."""
    from worker.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(64, MAX_POSITIONS, 10000.0)
    positions, q, k, v = _qkv(6, 8, 2, 64, torch.float32, "cpu", seed=3)
    slots = _slots(6, 16, 3, "cpu")
    keys, values = torch.zeros(2, NUM_BLOCKS, 16, 2, 64)
    got_q = rope.rotate_and_write_kv(positions, q, k, v, keys, values, slots)
    expected_q, expected_k = rope(positions, q, k)
    expected_keys, expected_values = torch.zeros(2, NUM_BLOCKS, 16, 2, 64)
    write_kv_cache_ref(expected_k, v, expected_keys, expected_values, slots)
    assert torch.equal(got_q, expected_q)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 4097])
def test_rotary_kv_cache_gpu_bf16_dispatch(num_tokens):
    """On the GPU through the dispatch point, bf16, the Llama-3-8B attention shape (32 q and 8
    KV heads of 128) with the model's cos/sin caches, block size 16: bit-identical."""
    import kernels
    from worker.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(128, MAX_POSITIONS, 500000.0)
    rope.build_cache(torch.device("cuda"))
    positions, q, k, v = _qkv(num_tokens, 32, 8, 128, torch.bfloat16, "cuda", seed=num_tokens)
    num_blocks = (num_tokens + 15) // 16 + 2
    slots = torch.randperm(num_blocks * 16, device="cuda")[:num_tokens]
    slots[1::5] = -1
    key_cache = torch.zeros(num_blocks, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
    value_cache = torch.zeros_like(key_cache)
    expected_keys, expected_values = key_cache.clone(), value_cache.clone()
    got_q = kernels.rotary_write_kv_cache(
        positions, q, k, v, rope.cos_cache, rope.sin_cache, key_cache, value_cache, slots
    )
    expected_q, rotated_k = rotary_ref(positions, q, k, rope.cos_cache, rope.sin_cache)
    write_kv_cache_ref(rotated_k, v, expected_keys, expected_values, slots)
    assert torch.equal(got_q, expected_q)
    assert torch.equal(key_cache, expected_keys) and torch.equal(value_cache, expected_values)
