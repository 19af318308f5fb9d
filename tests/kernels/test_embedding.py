"""Triton shard_embedding (a vocab-parallel embedding's lookup on one rank) against the torch
reference (CPU interpreter or GPU): ids inside, below and above the shard, ragged widths."""

import pytest
import torch

from kernels.embedding import shard_embedding_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 1000, 1025])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("start", [0, 50])
def test_shard_embedding_matches_reference(device, dtype, hidden, num_tokens, start):
    from kernels.triton_embedding import shard_embedding

    gen = torch.Generator().manual_seed(num_tokens * 31 + hidden + start)
    shard = 50
    weight = torch.randn(shard, hidden, generator=gen).to(dtype).to(device)
    # Global ids of a 100-token vocabulary over two ranks: about half are another rank's.
    ids = torch.randint(0, 100, (num_tokens,), generator=gen)
    ids[0] = start  # the shard's first row and its last
    ids[-1] = start + shard - 1
    ids = ids.to(device)
    got = shard_embedding(ids, weight, start)
    want = shard_embedding_ref(ids, weight, start)
    assert got.dtype == dtype and got.shape == (num_tokens, hidden)
    assert torch.equal(got, want)
    outside = (ids < start) | (ids >= start + shard)
    assert (got[outside] == 0).all() and not (got[~outside] == 0).all()


def test_no_tokens(device):
    from kernels.triton_embedding import shard_embedding

    weight = torch.randn(4, 16, device=device)
    out = shard_embedding(torch.zeros(0, dtype=torch.int64, device=device), weight, 0)
    assert out.shape == (0, 16)
