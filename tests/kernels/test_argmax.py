"""Triton row_max (each row's maximum and its lowest column) against torch.max (CPU
interpreter or GPU): random logits, ragged widths around its 1024-column chunks, ties within
and across chunks, strided views."""

import pytest
import torch

from kernels.argmax import row_max_ref

ROWS = [1, 3, 5]
# Below, at and above one chunk of 1024 columns, and ragged; the vocabularies' shards on the GPU.
WIDTHS = [1, 7, 1000, 1024, 1025, 3001] + [64128, 128256] * torch.cuda.is_available()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _logits(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows * 7919 + n)
    return (torch.randn(rows, n, generator=gen) * 5).to(dtype).to(device)


def _assert_same(got: tuple, want: tuple) -> None:
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64
    assert torch.equal(got[0].cpu(), want[0].cpu())
    assert torch.equal(got[1].cpu(), want[1].cpu())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_row_max_matches_torch(device, dtype, n, rows):
    from kernels.triton_argmax import row_max

    logits = _logits(rows, n, dtype, device)
    _assert_same(row_max(logits), row_max_ref(logits))


@pytest.mark.parametrize("n", [1031, 5000])
def test_ties_go_to_the_lowest_column(device, n):
    from kernels.triton_argmax import row_max

    logits = _logits(4, n, torch.bfloat16, device)
    top = logits.max() + 1
    logits[0, [n - 1, 3, 900]] = top  # three in different chunks (n - 1 in the last)
    logits[1, [1030, 1024]] = top  # two in one chunk, not at its start first
    logits[2, [n - 1]] = top  # the very last column
    logits[3] = float("-inf")  # nothing but -inf: column 0, as torch
    got = row_max(logits)
    assert got[1].tolist() == [3, 1024, n - 1, 0]
    _assert_same(got, row_max_ref(logits))


def test_strided_view_of_a_padded_shard(device):
    """The LM head's last shard: a view without its padding columns (row stride > width)."""
    from kernels.triton_argmax import row_max

    padded = _logits(3, 3000, torch.float32, device)
    padded[:, 2990:] = 1e9  # padding that must not be read
    view = padded[:, :2990]
    _assert_same(row_max(view), row_max_ref(view))


def test_rejects_what_is_not_rows_of_logits(device):
    from kernels.triton_argmax import row_max

    with pytest.raises(ValueError, match="rows, n"):
        row_max(torch.zeros(4, device=device))
    with pytest.raises(ValueError, match="rows, n"):
        row_max(torch.zeros(2, 0, device=device))
