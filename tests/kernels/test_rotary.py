"""Triton rotary embedding against the torch reference (CPU interpreter or GPU); the model layer's
CPU path against HF's formula.

Every comparison is exact (torch.equal), fp32 included: the kernel rounds each product and the
sum to x's dtype as the reference's torch ops do (for fp16 and bf16 a float32 product and sum
rounded once are the correctly rounded half-precision results), and its launch turns FMA
contraction off, so fp32's p1 + p2 is not fused into one fma on the GPU. The interpreter (numpy)
never fuses. bf16 runs on the GPU only: the interpreter rounds float32 to bf16 wrongly.
"""

import pytest
import torch

from kernels.rotary import rotary_ref
from tests.kernels.rotary_inputs import MAX_POSITIONS, poisoned, qkv_views, rotary_caches

# Ragged token counts (1 included); GQA ratios 1, 4 and 8 as (num_heads, num_kv_heads).
NUM_TOKENS = [1, 3, 17]
HEADS = [(4, 4), (8, 2), (8, 1)]
HEAD_DIM = [64, 128]


def _check(positions, q, k, cos, sin):
    """The kernel into poisoned outputs (an unwritten element fails) equals the reference, and
    leaves its inputs as they were."""
    from kernels.triton_rotary import rotary

    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = poisoned(q), poisoned(k)
    got_q, got_k = rotary(positions, q, k, cos, sin, q_out=q_out, k_out=k_out)
    assert got_q.data_ptr() == q_out.data_ptr() and got_k.data_ptr() == k_out.data_ptr()
    expected_q, expected_k = rotary_ref(positions, q, k, cos, sin)
    assert torch.equal(got_q, expected_q)
    assert torch.equal(got_k, expected_k)
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", HEAD_DIM)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rotary_matches_reference(device, dtype, head_dim, heads, num_tokens):
    num_heads, num_kv_heads = heads
    seed = num_tokens + 10 * num_heads + 100 * num_kv_heads + head_dim
    positions, q, k = qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, device, seed)
    if num_tokens > 1:  # (one token's view may take any token stride)
        assert q.stride(0) == k.stride(0) == (num_heads + 2 * num_kv_heads) * head_dim
    _check(positions, q, k, *rotary_caches(head_dim, device, seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_other_shapes_and_layouts(device, dtype):
    """head_dim 96 (a half of 48, padded to a 64-wide tile), more heads than one block holds
    (48 of 128: three q blocks, the last partial), contiguous inputs, a head stride wider than
    head_dim, a non-unit last stride (copied first), and new outputs."""
    from kernels.triton_rotary import rotary

    positions, q, k = qkv_views(5, 6, 2, 96, dtype, device, seed=1)
    _check(positions, q, k, *rotary_caches(96, device, seed=1))
    positions, q, k = qkv_views(7, 48, 4, 128, dtype, device, seed=2)
    cos, sin = rotary_caches(128, device, seed=2)
    _check(positions, q.contiguous(), k.contiguous(), cos, sin)
    wide = torch.randn(7, 4, 3 * 128).to(dtype).to(device)
    _check(positions, wide[:, :, 128:256], wide[:, :2, :128], cos, sin)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # last stride 48
    got_q, got_k = rotary(positions, q_t, k, cos, sin)
    expected_q, expected_k = rotary_ref(positions, q_t, k, cos, sin)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)


def test_rotary_empty_batch_and_bad_shapes(device):
    from kernels.triton_rotary import rotary

    cos, sin = rotary_caches(64, device, seed=0)
    positions = torch.empty(0, dtype=torch.int64, device=device)
    q, k = torch.empty(0, 4, 64, device=device), torch.empty(0, 2, 64, device=device)
    got_q, got_k = rotary(positions, q, k, cos, sin)
    assert got_q.shape == (0, 4, 64) and got_k.shape == (0, 2, 64)
    positions, q, k = qkv_views(3, 4, 2, 64, torch.float32, device, seed=0)
    with pytest.raises(ValueError):
        rotary(positions, q, k.half(), cos, sin)
    with pytest.raises(ValueError):
        rotary(positions, q[:, :, :32], k[:, :, :32], cos, sin)
    with pytest.raises(ValueError):
        rotary(positions, q, k, cos, sin, q_out=torch.empty(3, 4, 64, device=device).half())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cpu_path_is_hf_formula(dtype):
    """worker.layers.rotary.RotaryEmbedding on the CPU (Llama 3 scaling): bit-identical to HF's
    apply_rotary_pos_emb on the same cos/sin rows, q and k split from one QKV output."""
    from worker.layers.rotary import RotaryEmbedding

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    }
    rope = RotaryEmbedding(64, MAX_POSITIONS, 500000.0, scaling)
    positions, q, k = qkv_views(9, 8, 2, 64, dtype, "cpu", seed=5)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)

    cos = rope.cos_cache[positions].to(dtype).unsqueeze(1)  # HF: cos[position_ids].to(dtype)
    sin = rope.sin_cache[positions].to(dtype).unsqueeze(1)
    with torch.inference_mode():
        got_q, got_k = rope(positions, q, k)
    assert torch.equal(got_q, (q * cos) + (rotate_half(q) * sin))
    assert torch.equal(got_k, (k * cos) + (rotate_half(k) * sin))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 4097])
def test_rotary_gpu_bf16_dispatch(num_tokens):
    """On the GPU through the dispatch point, bf16 (the GPU rounds like torch), the Llama-3-8B
    attention shape with the model's cos/sin caches: bit-identical to the reference."""
    import kernels
    from worker.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(128, MAX_POSITIONS, 500000.0)
    rope.build_cache(torch.device("cuda"))
    positions, q, k = qkv_views(num_tokens, 32, 8, 128, torch.bfloat16, "cuda", seed=num_tokens)
    got_q, got_k = kernels.rotary(positions, q, k, rope.cos_cache, rope.sin_cache)
    expected_q, expected_k = rotary_ref(positions, q, k, rope.cos_cache, rope.sin_cache)
    assert torch.equal(got_q, expected_q) and torch.equal(got_k, expected_k)
    _check(positions, q, k, *rotary_caches(128, "cuda", seed=num_tokens))
