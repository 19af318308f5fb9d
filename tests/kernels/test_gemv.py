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


# float32 and fp16 here; bf16 on the GPU only (the CPU interpreter truncates casts to bf16).
SILU_DTYPES = [torch.float32, torch.float16] + [torch.bfloat16] * torch.cuda.is_available()


@pytest.mark.parametrize("dtype", SILU_DTYPES)
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]])
@pytest.mark.parametrize("n,k", [(37, 1500), (8, 64)])
def test_gemv_silu_gate_is_silu_and_mul_then_gemv(device, dtype, config, n, k):
    """silu_gate: the product of silu_and_mul(gate | up) computed in the same launch equals the
    two-kernel path (Triton SiLU-and-multiply, then the GEMV) bit for bit, and the torch
    reference (silu_and_mul_ref, then F.linear) to rounding. Gates span silu's curve; ragged
    K leaves a partial chunk whose masked gate and up must not count."""
    from kernels.activation import silu_and_mul_ref
    from kernels.triton_activation import silu_and_mul
    from kernels.triton_gemv import gemv

    gen = torch.Generator().manual_seed(n + k)
    gate_up = (torch.randn(1, 2 * k, generator=gen) * 4).to(dtype).to(device)
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype).to(device)
    got = gemv(gate_up, weight, None, config, silu_gate=True)
    assert got.shape == (1, n) and got.dtype == dtype
    assert torch.equal(got, gemv(silu_and_mul(gate_up), weight, None, config))
    expected = F.linear(silu_and_mul_ref(gate_up).float(), weight.float()).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_linear_with_silu_gate_on_every_path(device):
    """worker.layers.linear with silu_gate gives silu_and_mul's product on each path it takes:
    the fused GEMV (one CUDA row with a config), F.linear, and the CPU's few-row product."""
    from kernels.activation import silu_and_mul_ref
    from worker.layers.linear import linear

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 100, generator=gen).to(device)
    for rows, config in ((1, CONFIGS[1]), (1, None), (5, None), (70, None)):
        gate_up = torch.randn(rows, 200, generator=gen).to(device)
        expected = F.linear(silu_and_mul_ref(gate_up), weight)
        got = linear(gate_up, weight, None, config, silu_gate=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def test_gemv_refuses_what_does_not_fit(device):
    from kernels.triton_gemv import gemv

    weight = torch.randn(8, 64, device=device)
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(2, 64, device=device), weight, None, CONFIGS[0])
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.randn(1, 64, device=device), weight, torch.zeros(7, device=device), CONFIGS[0])
    with pytest.raises(ValueError, match="contiguous"):
        gemv(torch.randn(1, 8, device=device), weight.t(), None, CONFIGS[0])
    with pytest.raises(ValueError, match="gate and up"):
        gemv(torch.randn(1, 64, device=device), weight, None, CONFIGS[0], silu_gate=True)


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
    # The down projection's kind: gate and up in, timed against SiLU-and-multiply + cuBLAS.
    gated = kernels.choose_gemv(weight, silu_gate=True)
    assert gated is None or gated in CONFIGS
    gate_up = torch.randn(1, 8192, device="cuda", dtype=torch.bfloat16)
    got = kernels.gemv(gate_up, weight, None, gated or CONFIGS[-1], silu_gate=True)
    assert torch.equal(
        got, kernels.gemv(kernels.silu_and_mul(gate_up), weight, None, gated or CONFIGS[-1])
    )

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
