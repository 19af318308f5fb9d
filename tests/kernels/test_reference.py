"""The torch references against dense causal attention (torch SDPA), on random paged layouts."""

import pytest
import torch
import torch.nn.functional as F

from kernels import write_kv_cache
from kernels.paged_attention import paged_attention_ref


def _random_layout(seq_lens, block_size, num_blocks, gen):
    """A random, non-overlapping block table per sequence; padding blocks are 0."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, taken = [], 0
    for n in seq_lens:
        need = -(-n // block_size)
        tables.append(perm[taken : taken + need])
        taken += need
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_paged_attention_matches_dense_causal(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size * 100 + num_heads * 10 + num_kv_heads)
    head_dim = 32
    # (context after the step, new query tokens): prefill, decode, chunked prefill, block edges
    shapes = [(1, 1), (block_size, block_size), (block_size + 1, 1), (37, 5), (2 * block_size, 7)]
    seq_lens = [s for s, _ in shapes]
    q_lens = [q for _, q in shapes]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    block_tables = _random_layout(seq_lens, block_size, num_blocks, gen)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    value_cache = key_cache.clone()
    keys = [torch.randn(s, num_kv_heads, head_dim, generator=gen) for s in seq_lens]
    values = [torch.randn(s, num_kv_heads, head_dim, generator=gen) for s in seq_lens]
    for s, (k, v) in enumerate(zip(keys, values, strict=True)):
        pos = torch.arange(seq_lens[s])
        slots = block_tables[s, pos // block_size].long() * block_size + pos % block_size
        write_kv_cache(k, v, key_cache, value_cache, slots)
    queries = [torch.randn(q, num_heads, head_dim, generator=gen) for q in q_lens]
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = paged_attention_ref(
        torch.cat(queries),
        key_cache,
        value_cache,
        block_tables,
        torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc,
        head_dim**-0.5,
    )
    group = num_heads // num_kv_heads
    for s, (q, k, v) in enumerate(zip(queries, keys, values, strict=True)):
        L, n = seq_lens[s], q_lens[s]
        mask = torch.arange(L)[None, :] <= torch.arange(L - n, L)[:, None]  # [n, L]
        expected = F.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.repeat_interleave(group, 1).transpose(0, 1),
            v.repeat_interleave(group, 1).transpose(0, 1),
            attn_mask=mask,
        ).transpose(0, 1)
        got = out[query_start_loc[s] : query_start_loc[s + 1]]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_write_kv_cache_skips_padding_slots():
    key_cache = torch.zeros(2, 4, 1, 2)
    value_cache = torch.zeros(2, 4, 1, 2)
    k = torch.arange(6.0).reshape(3, 1, 2)
    write_kv_cache(k, -k, key_cache, value_cache, torch.tensor([5, -1, 0]))
    flat_k, flat_v = key_cache.view(-1, 1, 2), value_cache.view(-1, 1, 2)
    torch.testing.assert_close(flat_k[5], k[0])
    torch.testing.assert_close(flat_k[0], k[2])
    torch.testing.assert_close(flat_v[0], -k[2])
    assert flat_k[[1, 2, 3, 4, 6, 7]].abs().sum() == 0


def test_copy_blocks_copies_every_layer():
    from kernels import copy_blocks

    caches_k = [torch.randn(6, 4, 2, 8) for _ in range(3)]
    caches_v = [torch.randn(6, 4, 2, 8) for _ in range(3)]
    before_k = [c.clone() for c in caches_k]
    copy_blocks(caches_k, caches_v, torch.tensor([[0, 5], [2, 3]]))
    for before, after in zip(before_k, caches_k, strict=True):
        torch.testing.assert_close(after[5], before[0])
        torch.testing.assert_close(after[3], before[2])
        torch.testing.assert_close(after[[0, 1, 2, 4]], before[[0, 1, 2, 4]])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (9, 3), (8, 1)])
def test_decode_sequences_of_unlike_lengths_and_padding_entries(num_heads, num_kv_heads):
    """Decode tokens are attended in groups of like lengths, padded to their group's longest:
    lengths far apart (several groups, out of order), prefill rows between them, seq_len 0
    entries (zeros), and a NaN-poisoned cache past every sequence's end."""
    from tests.kernels.paged_inputs import make_batch, reference_attention

    shapes = [(300, 1), (1, 1), (0, 1), (17, 1), (40, 6), (700, 1), (16, 1), (299, 1), (2, 1)]
    batch = make_batch(shapes, 16, num_heads, num_kv_heads, 32, seed=num_heads)
    out = paged_attention_ref(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.block_tables,
        batch.seq_lens,
        batch.query_start_loc,
        0.2,
    )
    expected = reference_attention(batch, 0.2, dtype=torch.float32)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out[2].abs().sum() == 0
