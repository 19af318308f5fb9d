"""The CPU path of paged attention (kernels.cpu_paged_attention, what kernels.paged_attention
runs for CPU tensors) against the torch reference, on NaN-poisoned paged batches."""

import pytest
import torch

import kernels
from kernels.paged_attention import paged_attention_ref
from tests.kernels.paged_inputs import make_batch

SHAPES = {
    "decode": [(1, 1), (16, 1), (17, 1), (45, 1), (300, 1)],
    "unlike lengths, padding": [(300, 1), (1, 1), (0, 1), (17, 1), (700, 1), (299, 1), (2, 1)],
    "mixed": [(40, 6), (1, 1), (33, 33), (100, 1), (64, 16), (0, 0)],
}


@pytest.mark.parametrize("shapes", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_matches_reference(shapes, num_heads, num_kv_heads, dtype):
    batch = make_batch(SHAPES[shapes], 16, num_heads, num_kv_heads, 64, dtype=dtype, seed=3)
    args = (
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        0.125,
    )
    got = kernels.paged_attention(
        *args, max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len
    )
    expected = paged_attention_ref(*args)
    assert got.dtype == dtype and not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    for s, (seq_len, q_len) in enumerate(SHAPES[shapes]):
        if seq_len == 0 and q_len == 1:  # a padding entry: zeros
            assert got[batch.query_start_loc[s]].abs().sum() == 0
