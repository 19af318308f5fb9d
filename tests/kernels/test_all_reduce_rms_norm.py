"""kernels.triton_all_reduce_rms_norm against the reference (the sum over ranks, then
kernels.rms_norm's fused_add_rms_norm_ref), under TRITON_INTERPRET=1 on the CPU or on a GPU.

Two ranks are played in one process: each rank's copy of the symmetric buffer is a local
tensor, and rank 1's push for rank 0 is written by hand from the layout the module documents
(rank 0's kernel waits for it); then rank 1's own kernel runs, waits for the flags rank 0's
kernel raised in rank 1's copy, and must push exactly what the hand wrote and return rank 0's
result bit for bit. Calls of different row counts alternate the rows' parities apart.
The two-GPU test over real mapped memory is tests/worker/test_gpu_all_reduce.py."""

import pytest
import torch

from kernels.rms_norm import fused_add_rms_norm_ref
from kernels.triton_all_reduce_rms_norm import (
    all_reduce_add_rms_norm,
    buffer_bytes,
    flags_offset,
)

SLOT, MAX_ROWS, EPS = 2048, 16, 1e-6
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


class Rank:
    def __init__(self, world: int, dtype: torch.dtype, device: torch.device) -> None:
        nbytes = buffer_bytes(world, SLOT, MAX_ROWS, dtype)
        self.buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self.epochs = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self.world, self.dtype = world, dtype

    def data(self) -> torch.Tensor:  # [2 parities, world, SLOT]
        end = flags_offset(self.world, SLOT, self.dtype)
        return self.buffer[:end].view(self.dtype).view(2, self.world, SLOT)

    def flags(self) -> torch.Tensor:  # [2 parities, world, MAX_ROWS]
        start = flags_offset(self.world, SLOT, self.dtype)
        return self.buffer[start:].view(torch.int32).view(2, self.world, MAX_ROWS)


def _call(x, residual, weight, ranks, rank):
    ptrs = torch.tensor([r.buffer.data_ptr() for r in ranks], device=x.device)
    return all_reduce_add_rms_norm(
        x,
        residual,
        weight,
        EPS,
        buffer_ptrs=ptrs,
        epochs=ranks[rank].epochs,
        rank=rank,
        slot_elems=SLOT,
        max_rows=MAX_ROWS,
    )


def _check(got, want, dtype):
    (out, residual_out), (want_out, want_residual) = got, want
    assert torch.equal(residual_out, want_residual)  # one rounding of an exact float32 sum
    torch.testing.assert_close(out, want_out, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    if dtype == torch.float16:  # the sum order of the squares only: an ulp, rarely
        assert (out != want_out).float().mean().item() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden", [64, 100])
def test_one_rank_is_the_fused_add_and_norm(device, dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    ranks = [Rank(1, dtype, device)]
    weight = torch.randn(hidden, generator=gen).to(dtype).to(device)
    for rows in [3, 5, 1, 3, 16]:
        x, residual = (torch.randn(rows, hidden, generator=gen).to(dtype) for _ in range(2))
        x, residual = x.to(device), residual.to(device)
        got = _call(x, residual, weight, ranks, 0)
        _check(got, fused_add_rms_norm_ref(x, residual, weight, EPS), dtype)
    # Each row's epoch counts the calls that reached it: row 0 all 5, rows 5-15 the last.
    assert ranks[0].epochs.tolist() == [5, 4, 4, 2, 2] + [1] * 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_ranks_push_flag_and_sum_in_rank_order(device, dtype):
    hidden = 96
    gen = torch.Generator().manual_seed(7)
    ranks = [Rank(2, dtype, device), Rank(2, dtype, device)]
    weight = torch.randn(hidden, generator=gen).to(dtype).to(device)
    for rows in [4, 2, 4, 7, 1, 7]:
        parts = [torch.randn(rows, hidden, generator=gen).to(dtype).to(device) for _ in "ab"]
        residual = torch.randn(rows, hidden, generator=gen).to(dtype).to(device)
        epochs = ranks[0].epochs[:rows].long() + 1
        parity = epochs % 2
        # Rank 1's push into rank 0's copy, as the module's layout says.
        for row in range(rows):
            p = int(parity[row])
            ranks[0].data()[p, 1, row * hidden : (row + 1) * hidden] = parts[1][row]
            ranks[0].flags()[p, 1, row] = int(epochs[row])
        got0 = _call(parts[0], residual, weight, ranks, 0)
        summed = (parts[0].float() + parts[1].float()).to(dtype)
        _check(got0, fused_add_rms_norm_ref(summed, residual, weight, EPS), dtype)
        pushed_by_hand = ranks[0].data().clone()
        got1 = _call(parts[1], residual, weight, ranks, 1)
        assert torch.equal(ranks[0].data(), pushed_by_hand)  # rank 1 pushed where the hand did
        for a, b in zip(got0, got1, strict=True):
            assert torch.equal(a, b)  # every rank the same sum, bit for bit
        for row in range(rows):  # each rank raised its flag in both copies
            p = int(parity[row])
            for r in ranks:
                assert r.flags()[p, :, row].tolist() == [int(epochs[row])] * 2
    assert torch.equal(ranks[0].epochs, ranks[1].epochs)


def test_rows_beyond_the_buffer_are_refused(device):
    ranks = [Rank(1, torch.float32, device)]
    x = torch.zeros(MAX_ROWS + 1, 8, device=device)
    with pytest.raises(ValueError, match="exceed the buffer"):
        _call(x, x.clone(), torch.ones(8, device=device), ranks, 0)
    x = torch.zeros(2, SLOT, device=device)
    with pytest.raises(ValueError, match="exceed the buffer"):
        _call(x, x.clone(), torch.ones(SLOT, device=device), ranks, 0)
