"""Triton SiLU-and-multiply against the torch reference (CPU interpreter or GPU)."""

import pytest
import torch

from kernels.activation import silu_and_mul_ref

# Ragged token counts (1 included); widths below, at and above one block of 1024, and odd ones.
NUM_TOKENS = [1, 3, 17]
WIDTHS = [64, 1536, 2100]  # d (the intermediate size); 1536: SmolLM2-135M
# bf16 on the GPU only: Triton's CPU interpreter truncates float32 -> bf16 casts instead of
# rounding them to nearest, so there the kernel cannot match torch.
DTYPES = [torch.float32, torch.float16] + [torch.bfloat16] * torch.cuda.is_available()


def _gate_up(num_tokens: int, d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(num_tokens * 7919 + d)
    # Gates across silu's whole curve (large negative through large positive).
    return (torch.randn(num_tokens, 2 * d, generator=gen) * 4).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul_matches_reference(device, dtype, d, num_tokens):
    from kernels.triton_activation import silu_and_mul

    gate_up = _gate_up(num_tokens, d, dtype, device)
    out = torch.full((num_tokens, d), float("nan"), dtype=dtype, device=device)
    got = silu_and_mul(gate_up, out=out)
    assert got.data_ptr() == out.data_ptr()
    expected = silu_and_mul_ref(gate_up)
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:
        # exp may differ from torch's by a float32 ulp, which can move a rounding to the
        # neighbouring half value; anything else (a missed rounding step) moves many elements.
        torch.testing.assert_close(got, expected)
        assert (got != expected).float().mean().item() < 0.01


def test_silu_and_mul_takes_leading_dims_and_rejects_odd_widths(device):
    from kernels.triton_activation import silu_and_mul

    gate_up = _gate_up(6, 64, torch.float32, device).view(2, 3, 128)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up))
    with pytest.raises(ValueError, match="not even"):
        silu_and_mul(gate_up[..., :127])
