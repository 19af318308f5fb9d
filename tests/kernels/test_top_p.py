"""Triton top_p_floor against its torch reference (CPU interpreter or GPU): rows peaked and
flat, top_p from a few tokens' mass to nearly all of it, ragged widths around its 1024-column
blocks, inactive rows (-inf, untouched), strided views; and the reference against the sorted
definition of top-p's kept set."""

import pytest
import torch

from kernels.top_p import top_p_floor_ref

WIDTHS = [5, 1000, 1024, 1025, 3001] + [49152, 128256] * torch.cuda.is_available()


def _inputs(rows: int, n: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 7919 + n)
    scale = torch.tensor([0.3, 1.0, 4.0, 12.0])[torch.arange(rows) % 4]  # flat .. peaked
    logits = (torch.randn(rows, n, generator=gen) * scale[:, None]).to(device)
    peak = logits.max(dim=-1).values
    total = torch.exp(logits - peak[:, None]).sum(dim=-1)
    top_ps = torch.tensor([0.05, 0.5, 0.9, 0.95, 0.99, 0.999])[torch.arange(rows) % 6]
    active = torch.arange(rows) % 5 != 4  # every fifth row inactive
    return logits, peak, total, top_ps.to(device), active.to(device)


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", [1, 7])
def test_top_p_floor_matches_the_reference(device, rows, n):
    from kernels.triton_top_p import top_p_floor

    inputs = _inputs(rows, n, device, seed=rows)
    got, want = top_p_floor(*inputs).cpu(), top_p_floor_ref(*inputs).cpu()
    assert torch.equal(got, want), (got, want)
    active = inputs[-1].cpu()
    assert torch.isinf(got[~active]).all() and torch.isfinite(got[active]).all()


def test_a_strided_view_reads_its_own_rows(device):
    from kernels.triton_top_p import top_p_floor

    logits, peak, total, top_ps, active = _inputs(6, 2000, device, seed=3)
    wide = torch.zeros(6, 2600, device=device)
    wide[:, :2000] = logits
    view = wide[:, :2000]
    assert torch.equal(
        top_p_floor(view, peak, total, top_ps, active).cpu(),
        top_p_floor_ref(logits, peak, total, top_ps, active).cpu(),
    )


def test_the_reference_keeps_the_sorted_definitions_set():
    """Keeping every logit >= floor keeps the tokens whose mass before them, in descending
    order, is below top_p: the sampler's definition (tests/worker/test_sampler.py)."""
    logits, peak, total, top_ps, active = _inputs(12, 3001, "cpu", seed=5)
    floor = top_p_floor_ref(logits, peak, total, top_ps, active)
    probs = torch.softmax(logits, dim=-1)
    ordered, order = probs.sort(dim=-1, descending=True)
    keep_sorted = (ordered.cumsum(dim=-1) - ordered) < top_ps[:, None]
    want = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    got = logits >= floor[:, None]
    assert torch.equal(got[active], want[active])
    assert got[~active].all()
