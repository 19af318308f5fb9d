"""Triton RMSNorm (plain, and fused with the residual add) against the torch reference (CPU
interpreter or GPU); the model layer's CPU path against the unfused torch formula."""

import pytest
import torch

from kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref

EPS = 1e-5
# Ragged token counts (1 included) and hidden sizes that are not powers of two (576: SmolLM2).
NUM_TOKENS = [1, 3, 17]
HIDDEN = [64, 576, 2048, 2100]
# fp16: the normed row may round to the neighbouring fp16 value (another sum order), and the
# weight product carries that ulp; fp32 differs only by the sum order.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def _assert_matches(got: torch.Tensor, expected: torch.Tensor) -> None:
    tol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    if expected.dtype == torch.float16:
        # Within tolerance is not enough: skipping the rounding of the normed row to fp16 before
        # the weight product also stays within an ulp, but changes ~25% of the elements.
        assert (got != expected).float().mean().item() < 0.01


def _inputs(num_tokens, hidden, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    # Non-zero mean and a spread of scales per row, like a residual stream.
    x = torch.randn(num_tokens, hidden, generator=gen) * torch.rand(num_tokens, 1, generator=gen)
    residual = torch.randn(num_tokens, hidden, generator=gen) * 3 + 0.5
    weight = torch.randn(hidden, generator=gen) * 0.1 + 1
    return x.to(dtype).to(device), residual.to(dtype).to(device), weight.to(dtype).to(device)


def _poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.full_like(like, float("nan"))  # an unwritten element fails


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rms_norm_matches_reference(device, dtype, hidden, num_tokens):
    from kernels.triton_rms_norm import rms_norm

    x, _, weight = _inputs(num_tokens, hidden, dtype, device, seed=hidden + num_tokens)
    out = _poisoned(x)
    got = rms_norm(x, weight, EPS, out=out)
    assert got.data_ptr() == out.data_ptr()
    _assert_matches(got, rms_norm_ref(x, weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_fused_add_rms_norm_matches_reference(device, dtype, hidden, num_tokens):
    from kernels.triton_rms_norm import fused_add_rms_norm

    x, residual, weight = _inputs(num_tokens, hidden, dtype, device, seed=3 * hidden + num_tokens)
    out, residual_out = _poisoned(x), _poisoned(x)
    got, got_residual = fused_add_rms_norm(
        x, residual, weight, EPS, out=out, residual_out=residual_out
    )
    assert got.data_ptr() == out.data_ptr() and got_residual.data_ptr() == residual_out.data_ptr()
    expected, expected_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    # The add is one rounding of an exact sum, as torch's: bit-identical.
    torch.testing.assert_close(got_residual, expected_residual, rtol=0, atol=0)
    _assert_matches(got, expected)


def test_rms_norm_strided_rows_3d_and_fp32_weight(device):
    """Rows of a wider buffer (row stride > hidden), a [batch, seq, hidden] input, and an fp32
    weight on fp16 activations (the output is then fp32, as torch promotes)."""
    from kernels.triton_rms_norm import fused_add_rms_norm, rms_norm

    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(5, 3 * 576, generator=gen).to(device)
    x = wide[:, 576 : 2 * 576]
    weight = (torch.randn(576, generator=gen) + 1).to(device)
    torch.testing.assert_close(
        rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), rtol=1e-5, atol=1e-5
    )
    x3 = torch.randn(2, 3, 576, generator=gen).half().to(device)
    residual3 = torch.randn(2, 3, 576, generator=gen).half().to(device)
    got, got_residual = fused_add_rms_norm(x3, residual3, weight, EPS)
    expected, expected_residual = fused_add_rms_norm_ref(x3, residual3, weight, EPS)
    assert got.dtype == expected.dtype == torch.float32 and got.shape == (2, 3, 576)
    torch.testing.assert_close(got_residual, expected_residual, rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)


def test_rms_norm_empty_batch(device):
    from kernels.triton_rms_norm import fused_add_rms_norm, rms_norm

    x = torch.empty(0, 64, device=device)
    weight = torch.ones(64, device=device)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    out, residual_out = fused_add_rms_norm(x, x, weight, EPS)
    assert out.shape == residual_out.shape == (0, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_cpu_path_is_the_unfused_torch_formula(dtype):
    """worker.layers.norm.RMSNorm on the CPU: bit-identical to HF's formula, and its fused form
    to `x + residual` followed by it (what the model's layers compute)."""
    from worker.layers.norm import RMSNorm

    gen = torch.Generator().manual_seed(11)
    norm = RMSNorm(576, EPS)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=gen) * 0.1 + 1)
    norm.to(dtype)
    x = torch.randn(9, 576, generator=gen).to(dtype)
    residual = torch.randn(9, 576, generator=gen).to(dtype)

    def hf(h: torch.Tensor) -> torch.Tensor:
        hf_dtype = h.dtype
        h = h.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        return norm.weight * h.to(hf_dtype)

    with torch.inference_mode():
        assert torch.equal(norm(x), hf(x))
        out, residual_out = norm(x, residual)
        assert torch.equal(residual_out, residual + x)
        assert torch.equal(out, hf(residual + x))


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 4097])
def test_rms_norm_gpu_bf16_dispatch(num_tokens):
    """On the GPU through the dispatch point, bf16 (the GPU rounds like torch): the residual
    stream is bit-identical to torch's add, the output within one bf16 ulp of torch's."""
    import kernels

    x, residual, weight = _inputs(num_tokens, 4096, torch.bfloat16, "cuda", seed=num_tokens)
    out, residual_out = kernels.fused_add_rms_norm(x, residual, weight, EPS)
    expected, expected_residual = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert torch.equal(residual_out, expected_residual)
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=2**-7)
    plain = kernels.rms_norm(x, weight, EPS)
    torch.testing.assert_close(plain, rms_norm_ref(x, weight, EPS), rtol=2**-7, atol=2**-7)
