"""Triton paged decode attention against the torch reference (CPU interpreter or GPU), and the
bf16 kernel against a float64 reference on realistic shapes (GPU only)."""

import pytest
import torch

from kernels.paged_attention import paged_attention_ref
from kernels.triton_launch import cdiv
from tests.kernels.paged_inputs import (
    make_batch,
    reference_attention,
    relative_error,
    skip_bf16_dot_on_interpreter,
)

# Small shapes: the CPU interpreter runs every program in Python.
HEAD_DIM = 16


def _decode_shapes(block_size: int) -> list[tuple[int, int]]:
    """(seq_len, 1): a single token, exact block edges, one past an edge, ragged."""
    return [(1, 1), (block_size, 1), (block_size + 1, 1), (2 * block_size, 1), (45, 1)]


def _run_decode(batch, scale, config=None, workspace_poison=True):
    from kernels.triton_decode_attention import decode_attention, workspace_numel

    out = torch.full_like(batch.query, float("nan"))  # poisoned: an unwritten row fails
    workspace = None
    if config is not None and config.num_splits > 1 and workspace_poison:
        num_seqs, num_heads, head_dim = batch.query.shape
        workspace = torch.full(
            (workspace_numel(num_seqs, num_heads, head_dim, config.num_splits),),
            float("nan"),
            device=batch.query.device,
        )
    return decode_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        scale,
        config=config,
        out=out,
        workspace=workspace,
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


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(device, block_size, num_heads, num_kv_heads, num_splits):
    from kernels.triton_decode_attention import DecodeConfig

    batch = make_batch(
        _decode_shapes(block_size),
        block_size,
        num_heads,
        num_kv_heads,
        HEAD_DIM,
        device=device,
        seed=block_size + num_heads + num_splits,
    )
    # 16-token tiles: several tiles per split, and tiles that span pages (block_size 8) or
    # stay inside one (32).
    config = DecodeConfig(num_splits=num_splits, block_n=16, num_warps=4, num_stages=3)
    scale = HEAD_DIM**-0.5
    got = _run_decode(batch, scale, config)
    torch.testing.assert_close(got, _expected(batch, scale), rtol=2e-5, atol=2e-5)


def test_decode_default_config_and_padding_entries(device):
    """The shape-only heuristic on a small batch (it splits: few programs on few SMs), a GQA
    head group that is not a power of two, a head_dim that is not, and seq_len 0 entries
    (CUDA-graph padding) that must come out as zeros, not NaN."""
    block_size, num_heads, num_kv_heads, head_dim = 16, 6, 2, 24
    shapes = [(0, 1), (70, 1), (16, 1), (0, 1), (3, 1)]
    batch = make_batch(shapes, block_size, num_heads, num_kv_heads, head_dim, device=device)
    scale = 0.3
    got = _run_decode(batch, scale)
    expected = reference_attention(batch, scale, dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    assert got[0].abs().sum() == 0 and got[3].abs().sum() == 0


def test_decode_split_padded_group_and_head_dim(device):
    """A split launch whose GQA group (3) and head_dim (24) are both padded inside: the partial
    states and the merge must ignore the padding rows and columns (the workspace is NaN)."""
    from kernels.triton_decode_attention import DecodeConfig

    shapes = [(70, 1), (16, 1), (0, 1), (3, 1), (33, 1)]
    batch = make_batch(shapes, 8, 6, 2, 24, device=device, seed=5)
    config = DecodeConfig(num_splits=3, block_n=16, num_warps=4, num_stages=2)
    got = _run_decode(batch, 0.3, config)
    expected = reference_attention(batch, 0.3, dtype=torch.float32)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)
    assert got[2].abs().sum() == 0


def test_decode_rejects_value_cache_with_other_strides(device):
    """One row offset per token addresses both caches, so their strides must match."""
    from kernels.triton_decode_attention import decode_attention

    batch = make_batch([(20, 1)], 8, 4, 2, HEAD_DIM, device=device)
    num_blocks, block_size, num_kv_heads, head_dim = batch.key_cache.shape
    value_cache = torch.empty(
        num_blocks, num_kv_heads, block_size, head_dim, device=device
    ).transpose(1, 2)  # same shape, head_dim still contiguous, other strides
    value_cache.copy_(batch.value_cache)
    with pytest.raises(ValueError, match="same shape and strides"):
        decode_attention(
            batch.query, batch.key_cache, value_cache, batch.block_tables, batch.seq_lens, 0.25
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half_precision(device, dtype):
    from kernels.triton_decode_attention import DecodeConfig

    skip_bf16_dot_on_interpreter(device, dtype)
    batch = make_batch(
        _decode_shapes(8), 8, 8, 2, 32, dtype=dtype, device=device, seed=int(dtype.itemsize)
    )
    config = DecodeConfig(num_splits=2, block_n=16, num_warps=4, num_stages=3)
    got = _run_decode(batch, 32**-0.5, config)
    assert got.dtype == dtype
    expected = reference_attention(batch, 32**-0.5)
    assert relative_error(got, expected) <= 1e-2


def test_decode_query_view_of_fused_qkv(device):
    """The model hands over q as a strided view of a fused qkv projection."""
    from kernels.triton_decode_attention import DecodeConfig

    batch = make_batch(_decode_shapes(8), 8, 4, 1, HEAD_DIM, device=device, seed=7)
    num_seqs = batch.query.shape[0]
    qkv = torch.randn(num_seqs, (4 + 2) * HEAD_DIM, device=device)
    qkv[:, : 4 * HEAD_DIM] = batch.query.reshape(num_seqs, -1)
    batch.query = qkv[:, : 4 * HEAD_DIM].view(num_seqs, 4, HEAD_DIM)
    assert not batch.query.is_contiguous()
    config = DecodeConfig(num_splits=2, block_n=16, num_warps=4, num_stages=3)
    got = _run_decode(batch, 0.25, config)
    torch.testing.assert_close(got, _expected(batch, 0.25), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("merge_elements_per_thread", [64, 1])
def test_decode_fused_merge_repeats_and_resets_counters(
    device, monkeypatch, merge_elements_per_thread
):
    """The last active split program of each (sequence, KV head) merges and resets its ticket
    counter: a second call (as a CUDA-graph replay would be) gives the same result, and every
    counter is back at 0. Sequences use as many splits as they have tiles (3, 1, 1 and 7 of
    the 7 here: the one-split ones write their output directly, and the idle programs take no
    ticket); a tiny merge tile makes the merge take several (ragged) chunks of splits."""
    from kernels import triton_decode_attention as tda

    monkeypatch.setattr(tda, "_MERGE_ELEMENTS_PER_THREAD", merge_elements_per_thread)
    batch = make_batch(
        [(45, 1), (0, 1), (1, 1), (100, 1)], 8, 8, 2, HEAD_DIM, device=device, seed=11
    )
    config = tda.DecodeConfig(num_splits=7, block_n=16, num_warps=4, num_stages=2)
    scale = HEAD_DIM**-0.5
    expected = _expected(batch, scale)
    first = _run_decode(batch, scale, config)
    second = _run_decode(batch, scale, config)
    torch.testing.assert_close(first, expected, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert second[1].abs().sum() == 0
    counters = tda._ticket_counters(batch.query.device, 1)
    assert counters.numel() >= 4 * 2 and not counters.any()


def test_decode_config_depends_on_shapes_only():
    from kernels.triton_decode_attention import decode_config

    bf16 = torch.bfloat16
    # One sequence of Llama-3-8B on an H100 (132 SMs): split up to the cap, one program per SM
    # with two tiles in flight; 16 sequences: one wave of 3 programs per SM, one tile each.
    small = decode_config(1, 32, 8, 128, 16, bf16, 132)
    assert small.num_splits == 16 and small.block_n == 64 and small.num_stages == 3
    medium = decode_config(16, 32, 8, 128, 16, bf16, 132)
    assert medium.num_splits == 3 and medium.num_stages == 2
    # A batch that fills the card on its own runs unsplit (no workspace, no merge).
    assert decode_config(256, 32, 8, 128, 16, bf16, 132).num_splits == 1
    # Never more splits than the cap; tile height follows the dtype.
    assert decode_config(1, 8, 1, 128, 16, bf16, 1000).num_splits <= 16
    assert decode_config(4, 32, 8, 128, 16, torch.float32, 132).block_n == 32
    for bs in (8, 16, 32, 64, 128):  # block_size does not change the launch
        assert decode_config(16, 32, 8, 128, bs, bf16, 132) == decode_config(
            16, 32, 8, 128, 16, bf16, 132
        )


# ---------------------------------------------------------------- GPU: realistic shapes, bf16


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [8, 16, 32, 64, 128])
def test_decode_gpu_bf16_against_float64(block_size):
    lens = [1, 17, block_size, block_size + 1, 1000, 2047, 3000, 4096]
    batch = make_batch(
        [(n, 1) for n in lens], block_size, 32, 8, 128, dtype=torch.bfloat16, device="cuda"
    )
    expected = reference_attention(batch, 128**-0.5)
    from kernels import paged_attention

    got = paged_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        128**-0.5,
        max_query_len=1,
        max_seq_len=batch.max_seq_len,
    )
    for s in range(len(lens)):
        assert relative_error(got[s], expected[s]) <= 1e-2, (block_size, lens[s])


@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 3, 64])
def test_decode_gpu_every_split_count(num_seqs):
    from kernels.triton_decode_attention import DecodeConfig

    lens = [(4096 - 37 * i) % 4096 + 1 for i in range(num_seqs)]
    batch = make_batch(
        [(n, 1) for n in lens], 16, 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=3
    )
    expected = reference_attention(batch, 128**-0.5)
    for splits in (1, 2, 7, 64):
        config = DecodeConfig(num_splits=splits, block_n=64, num_warps=4, num_stages=3)
        got = _run_decode(batch, 128**-0.5, config)
        assert relative_error(got, expected) <= 1e-2, splits


@pytest.mark.gpu
def test_decode_gpu_cuda_graph_replays_new_lengths():
    """The launch reads nothing on the host: capture once, then replay after the sequences
    grew (and after a padding entry appeared) without recapturing."""
    from kernels import paged_attention

    shapes = [(n, 1) for n in (100, 1, 4000, 513)]
    batch = make_batch(shapes, 16, 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    scale = 128**-0.5
    seq_lens = batch.seq_lens.clone()

    def step():
        return paged_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache,
            batch.block_tables,
            seq_lens,
            batch.query_start_loc,
            scale,
            max_query_len=1,
            max_seq_len=4096,
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for new_lens in ([100, 1, 4000, 513], [37, 0, cdiv(4000, 2), 512]):
        seq_lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        trimmed = make_batch(
            [(n, 1) for n in new_lens], 16, 32, 8, 128, dtype=torch.bfloat16, device="cuda"
        )
        trimmed.query = batch.query
        trimmed.keys = [k[:n] for k, n in zip(batch.keys, new_lens, strict=True)]
        trimmed.values = [v[:n] for v, n in zip(batch.values, new_lens, strict=True)]
        expected = reference_attention(trimmed, scale)
        for s, n in enumerate(new_lens):
            if n == 0:
                assert out[s].abs().sum() == 0
            else:
                assert relative_error(out[s], expected[s]) <= 1e-2
