"""Triton paged prefill / extend attention against the torch reference (CPU interpreter or GPU):
chunked prefill over a cached prefix, mixed prefill + decode batches, ragged lengths; and the
bf16 kernel against a float64 reference on realistic shapes (GPU only)."""

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from tests.kernels.paged_inputs import (
    make_batch,
    reference_attention,
    relative_error,
    skip_bf16_dot_on_interpreter,
)

HEAD_DIM = 16


def _mixed_shapes(block_size: int) -> list[tuple[int, int]]:
    """(seq_len, q_len): decode rows, a whole prompt ending on a block edge, chunked prefill over
    a cached prefix, a prefix-cache hit of whole blocks, a ragged prompt."""
    return [
        (1, 1),
        (block_size, block_size),
        (block_size + 1, 1),
        (37, 5),
        (2 * block_size + 3, block_size + 3),
        (3 * block_size, 2),
        (23, 23),
    ]


def _run_prefill(batch, scale, config=None, one_token_context=0):
    from kernels.triton_prefill_attention import prefill_attention

    out = torch.full_like(batch.query, float("nan"))  # poisoned: an unwritten row fails
    return prefill_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        scale,
        max_query_len=batch.max_query_len,
        one_token_context=one_token_context,
        config=config,
        out=out,
    )


def _expected(batch, scale):
    return paged_attention_ref(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        scale,
    )


@pytest.mark.parametrize("one_token_context", [0, 1 << 30], ids=["one launch", "two launches"])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 1), (8, 1)])
def test_prefill_matches_reference(device, block_size, num_heads, num_kv_heads, one_token_context):
    batch = make_batch(
        _mixed_shapes(block_size),
        block_size,
        num_heads,
        num_kv_heads,
        HEAD_DIM,
        device=device,
        seed=block_size + num_heads,
    )
    scale = HEAD_DIM**-0.5
    got = _run_prefill(batch, scale, one_token_context=one_token_context)  # shape-derived tiles
    torch.testing.assert_close(got, _expected(batch, scale), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("extra", [-1, 0, 1])
def test_one_token_sequences_get_a_launch_of_their_own_past_the_split_context(
    device, monkeypatch, extra
):
    """Past SPLIT_CONTEXT tokens of one-token sequences' context (the caller's sum), a decode
    beside prompts takes the lowest tiles in a launch of its own, the prompts theirs in another;
    up to it one launch in the prompts' tiles attends every sequence whatever their lengths.
    The output is the same either way."""
    from kernels import triton_prefill_attention as tpa

    launched = []
    launch = tpa._launch
    monkeypatch.setattr(tpa, "_launch", lambda *a: launched.append(a[-1]) or launch(*a))
    batch = make_batch(_mixed_shapes(16), 16, 4, 1, HEAD_DIM, device=device, seed=3)
    got = _run_prefill(batch, 0.25, one_token_context=tpa.SPLIT_CONTEXT + extra)
    torch.testing.assert_close(got, _expected(batch, 0.25), rtol=2e-5, atol=2e-5)
    two = [tpa.ONE_TOKEN, tpa.LONGER]
    assert launched == (two if extra > 0 else [tpa.EVERY])


@pytest.mark.parametrize("block_q,block_n", [(2, 16), (8, 32)])
def test_prefill_small_tiles(device, block_q, block_n):
    """Many query tiles per sequence and keys tiles that straddle pages or sit inside one."""
    from kernels.triton_prefill_attention import PrefillConfig

    batch = make_batch(_mixed_shapes(16), 16, 4, 1, HEAD_DIM, device=device, seed=block_q)
    config = PrefillConfig(block_q=block_q, block_n=block_n, num_warps=4, num_stages=3)
    got = _run_prefill(batch, 0.2, config)
    torch.testing.assert_close(got, _expected(batch, 0.2), rtol=2e-5, atol=2e-5)


def test_prefill_odd_group_and_head_dim_and_empty_sequences(device):
    """A group of 3 heads, head_dim 24, and sequences with no new tokens (q_len 0) in between."""
    shapes = [(5, 0), (30, 30), (12, 0), (9, 4), (1, 1)]
    batch = make_batch(shapes, 8, 6, 2, 24, device=device, seed=11)
    got = _run_prefill(batch, 0.2)
    expected = reference_attention(batch, 0.2, dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_precision(device, dtype):
    skip_bf16_dot_on_interpreter(device, dtype)
    batch = make_batch(_mixed_shapes(8), 8, 8, 2, 32, dtype=dtype, device=device, seed=2)
    got = _run_prefill(batch, 32**-0.5)
    assert got.dtype == dtype
    assert relative_error(got, reference_attention(batch, 32**-0.5)) <= 1e-2


def test_dispatch_picks_decode_only_for_one_token_per_sequence(device, monkeypatch):
    """kernels.paged_attention on CUDA: decode when every sequence has one token, else
    prefill; on CPU: the reference. (num_tokens == num_seqs alone is not enough: q_lens 2, 0.)"""
    import kernels

    if device.type != "cuda":
        batch = make_batch([(3, 1), (9, 1)], 8, 2, 1, HEAD_DIM)
        got = kernels.paged_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            0.25,
            max_query_len=1,
            max_seq_len=9,
        )
        torch.testing.assert_close(got, _expected(batch, 0.25))
        return
    ops = kernels._triton()
    calls = []
    monkeypatch.setattr(ops, "decode_attention", lambda *a, **k: calls.append("decode"))
    monkeypatch.setattr(ops, "prefill_attention", lambda *a, **k: calls.append("prefill"))
    for shapes in ([(3, 1), (9, 1)], [(3, 2), (9, 0)], [(3, 3), (9, 1)]):
        batch = make_batch(shapes, 8, 2, 1, HEAD_DIM, device=device)
        kernels.paged_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache,
            batch.block_tables,
            batch.seq_lens,
            batch.query_start_loc,
            0.25,
            max_query_len=batch.max_query_len,
            max_seq_len=batch.max_seq_len,
        )
    assert calls == ["decode", "prefill", "prefill"]


# ---------------------------------------------------------------- GPU: realistic shapes, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_prefill_gpu_bf16_against_float64(block_size):
    from kernels import paged_attention

    shapes = [
        (4096, 4096),  # a whole prompt
        (3000, 512),  # a chunk of a long prompt over its cached prefix
        (1, 1),
        (2048, 1),  # decodes in the same batch
        (1000, 1),
        (700, 300),
        (block_size * 9, block_size * 2),  # a prefix-cache hit of whole blocks
        (333, 333),
    ]
    batch = make_batch(shapes, block_size, 32, 8, 128, dtype=torch.bfloat16, device="cuda")
    expected = reference_attention(batch, 128**-0.5)
    got = paged_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        128**-0.5,
        max_query_len=batch.max_query_len,
        max_seq_len=batch.max_seq_len,
    )
    starts = batch.query_start_loc.tolist()
    for s, (seq_len, q_len) in enumerate(shapes):
        rows = slice(starts[s], starts[s + 1])
        assert relative_error(got[rows], expected[rows]) <= 1e-2, (block_size, seq_len, q_len)
