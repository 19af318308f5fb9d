"""The Triton GEMV (one row times a weight) against F.linear (CPU interpreter or GPU), every
configuration choose() may take; choose() and the layers' choice on the GPU.

Sums run in another order than F.linear's, so results agree to float32 rounding (interpreter)
or to the last bits of bf16 (GPU), not bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from kernels.triton_gemv import CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n,k", [(37, 1500), (16, 512), (1, 2049)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(device, config, n, k, with_bias):
    """Ragged N and K (partial row blocks and K chunks), one output row, bias or none."""
    from kernels.triton_gemv import gemv

    gen = torch.Generator().manual_seed(n * k + with_bias)
    x = torch.randn(1, k, generator=gen).to(device)
    weight = torch.randn(n, k, generator=gen).to(device)
    bias = torch.randn(n, generator=gen).to(device) if with_bias else None
    got = gemv(x, weight, bias, config)
    assert got.shape == (1, n) and got.dtype == x.dtype
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)


def test_gemv_strided_weight_and_half_precision(device):
    """A weight whose rows are wider than K (a column slice of a bigger matrix: a row-parallel
    shard), a non-contiguous x row, and fp16 (rounded once from the float32 sum)."""
    from kernels.triton_gemv import gemv

    gen = torch.Generator().manual_seed(7)
    wide = torch.randn(24, 700, generator=gen).to(device)
    weight = wide[:, 100:600]  # [24, 500], row stride 700
    x = torch.randn(2, 500, generator=gen).to(device)[1:]
    torch.testing.assert_close(
        gemv(x, weight, None, CONFIGS[1]), F.linear(x, weight), rtol=1e-5, atol=1e-4
    )
    half_w, half_x = weight.half(), x.half()
    expected = F.linear(half_x.float(), half_w.float()).half()
    torch.testing.assert_close(gemv(half_x, half_w, None, CONFIGS[2]), expected, rtol=1e-3, atol=0)


def test_gemv_refuses_what_does_not_fit(device):
    from kernels.triton_gemv import gemv

    weight = torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 64, device=device), weight, None, CONFIGS[0])
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(1, 64, device=device), weight, torch.zeros(7, device=device), CONFIGS[0])
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(1, 8, device=device), weight.t(), None, CONFIGS[0])


@pytest.mark.gpu
def test_choose_on_the_gpu_and_the_layers_choice():
    """choose() returns one of CONFIGS or None on the Llama-3-8B o_proj shape (bf16), whose
    choice then computes F.linear's product to bf16's last bits; choose_one_row gives every
    half-precision linear layer of a model a choice, the same per weight shape, and a float32
    model none."""
    import kernels
    from worker.layers.linear import ColumnParallelLinear, RowParallelLinear, choose_one_row

    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    config = kernels.choose_gemv(weight)
    assert config is None or config in CONFIGS
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    expected = F.linear(x.float(), weight.float())
    got = kernels.gemv(x, weight, None, config or CONFIGS[-1]).float()
    torch.testing.assert_close(got, expected, rtol=2**-7, atol=1e-2)

    model = torch.nn.Sequential(
        ColumnParallelLinear(1024, 3072, bias=False),
        RowParallelLinear(3072, 1024, bias=False),
        ColumnParallelLinear(1024, 3072, bias=True),
    ).to(device="cuda", dtype=torch.bfloat16)
    for layer in model:
        layer.one_row = "unset"
    chosen = choose_one_row(model)
    assert all(layer.one_row is None or layer.one_row in CONFIGS for layer in model)
    assert model[0].one_row == model[2].one_row  # one timing per weight shape
    assert chosen == sum(layer.one_row is not None for layer in model)
    model.float()
    for layer in model:
        layer.one_row = "unset"
    assert choose_one_row(model) == 0
    assert all(layer.one_row == "unset" for layer in model)
