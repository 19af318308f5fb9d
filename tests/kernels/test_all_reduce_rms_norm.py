"""kernels.triton_all_reduce_rms_norm against the reference (the sum over ranks, then
kernels.rms_norm's fused_add_rms_norm_ref), under TRITON_INTERPRET=1 on the CPU or on a GPU.

Two ranks are played in one process: each rank's copy of the symmetric buffer is a local
tensor, and rank 1's push for rank 0 is written by hand from the layout the module documents
(rank 0's kernel waits for it); then rank 1's own kernel runs, finds rank 0's push in its copy,
and must push exactly what the hand wrote and return rank 0's result bit for bit. Between calls
every copy holds negative zeros only (a rank resets what it read). Calls of different row counts
alternate the rows' parities apart. The two-GPU test over real mapped memory is
tests/worker/test_gpu_all_reduce.py."""

import pytest
import torch

from kernels.rms_norm import fused_add_rms_norm_ref
from kernels.triton_all_reduce_rms_norm import (
    all_reduce_add_rms_norm,
    buffer_bytes,
    fill_negative_zeros,
)

SLOT, MAX_ROWS, EPS = 2048, 16, 1e-6
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}
SIGN_BIT = {torch.float32: torch.int32, torch.float16: torch.int16}


class Rank:
    def __init__(self, world: int, dtype: torch.dtype, device: torch.device) -> None:
        nbytes = buffer_bytes(world, SLOT, dtype)
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        fill_negative_zeros(self.buffer, dtype)
        self.epochs = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self.world, self.dtype = world, dtype

    def data(self) -> torch.Tensor:  # [2 parities, world, SLOT]
        return self.buffer.view(self.dtype).view(2, self.world, SLOT)

    def is_empty(self) -> bool:
        """Every element negative zero: the state between calls."""
        bits = self.buffer.view(SIGN_BIT[self.dtype])
        return bool((bits == torch.iinfo(bits.dtype).min).all())


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
        assert ranks[0].is_empty()
    # Each row's epoch counts the calls that reached it: row 0 all 5, rows 5-15 the last.
    assert ranks[0].epochs.tolist() == [5, 4, 4, 2, 2] + [1] * 11


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_ranks_push_and_sum_in_rank_order(device, dtype):
    hidden = 96
    gen = torch.Generator().manual_seed(7)
    ranks = [Rank(2, dtype, device), Rank(2, dtype, device)]
    weight = torch.randn(hidden, generator=gen).to(dtype).to(device)
    for rows in [4, 2, 4, 7, 1, 7]:
        parts = [torch.randn(rows, hidden, generator=gen).to(dtype).to(device) for _ in "ab"]
        parts[0][0, :5] = 0.0  # zeros: sent as they are
        parts[1][0, 5:9] = -0.0  # negative zeros: sent as positive ones
        residual = torch.randn(rows, hidden, generator=gen).to(dtype).to(device)
        parity = (ranks[0].epochs[:rows].long() + 1) % 2
        # Rank 1's push into rank 0's copy, as the module's layout says.
        pushed = parts[1].abs().where(parts[1] == 0, parts[1])  # -0.0 -> +0.0
        for row in range(rows):
            ranks[0].data()[int(parity[row]), 1, row * hidden : (row + 1) * hidden] = pushed[row]
        got0 = _call(parts[0], residual, weight, ranks, 0)
        summed = (parts[0].float() + parts[1].float()).to(dtype)
        _check(got0, fused_add_rms_norm_ref(summed, residual, weight, EPS), dtype)
        assert ranks[0].is_empty()  # rank 0 reset the slots it read
        # Rank 0 pushed its rows into rank 1's copy: there, and nowhere else.
        data1 = ranks[1].data()
        for row in range(rows):
            p, cols = int(parity[row]), slice(row * hidden, (row + 1) * hidden)
            assert torch.equal(data1[p, 0, cols], parts[0][row])
            data1[p, 0, cols] = -0.0
        assert ranks[1].is_empty()
        for row in range(rows):  # back, for rank 1's own call
            data1[int(parity[row]), 0, row * hidden : (row + 1) * hidden] = parts[0][row]
        got1 = _call(parts[1], residual, weight, ranks, 1)
        assert ranks[1].is_empty()
        sent_by_rank_1 = ranks[0].data().clone()
        for row in range(rows):  # rank 1 pushed what the hand did, where it did
            p, cols = int(parity[row]), slice(row * hidden, (row + 1) * hidden)
            got_bits = sent_by_rank_1[p, 1, cols].view(SIGN_BIT[dtype])
            assert torch.equal(got_bits, pushed[row].view(SIGN_BIT[dtype]))
            ranks[0].data()[p, 1, cols] = -0.0  # as if rank 0 had read it after the push
        assert ranks[0].is_empty()
        for a, b in zip(got0, got1, strict=True):
            assert torch.equal(a, b)  # every rank the same sum, bit for bit
    assert torch.equal(ranks[0].epochs, ranks[1].epochs)


def test_rows_beyond_the_buffer_are_refused(device):
    ranks = [Rank(1, torch.float32, device)]
    x = torch.zeros(MAX_ROWS + 1, 8, device=device)
    with pytest.raises(ValueError, match="exceed the buffer"):
        _call(x, x.clone(), torch.ones(8, device=device), ranks, 0)
    x = torch.zeros(2, SLOT, device=device)
    with pytest.raises(ValueError, match="exceed the buffer"):
        _call(x, x.clone(), torch.ones(SLOT, device=device), ranks, 0)
