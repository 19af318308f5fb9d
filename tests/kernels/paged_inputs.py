"""Random paged-KV batches for the kernel tests: scattered block tables, a NaN-poisoned cache
(any read of an unwritten slot or a padding block shows up as NaN), and the dense K/V per
sequence for the references."""

from dataclasses import dataclass

import pytest
import torch


@dataclass
class PagedBatch:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    keys: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim]
    values: list[torch.Tensor]
    q_lens: list[int]

    @property
    def max_query_len(self) -> int:
        return max(self.q_lens, default=0)

    @property
    def max_seq_len(self) -> int:
        return int(max(self.seq_lens.tolist(), default=0))


def make_batch(
    shapes: list[tuple[int, int]],
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    spare_blocks: int = 3,
) -> PagedBatch:
    """shapes: (seq_len, q_len) per sequence. Block ids are a random permutation; table padding
    points at a spare block that stays NaN, as do the unused slots of every partial block."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [s for s, _ in shapes]
    q_lens = [q for _, q in shapes]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    poison_block = perm[-1]
    tables, taken = [], 0
    for n in need:
        tables.append(perm[taken : taken + n])
        taken += n
    width = max(max(need, default=0), 1) + 1  # at least one padding column
    block_tables = torch.tensor(
        [t + [poison_block] * (width - len(t)) for t in tables], dtype=torch.int32
    ).reshape(len(shapes), width)

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    keys, values = [], []
    for s, seq_len in enumerate(seq_lens):
        k = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(seq_len)
        blocks = block_tables[s, pos // block_size].long()
        key_cache[blocks, pos % block_size] = k
        value_cache[blocks, pos % block_size] = v
        keys.append(k.to(device))
        values.append(v.to(device))
    query = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen).to(dtype)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return PagedBatch(
        query=query.to(device),
        key_cache=key_cache.to(device),
        value_cache=value_cache.to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        keys=keys,
        values=values,
        q_lens=q_lens,
    )


def reference_attention(batch: PagedBatch, scale: float, dtype=torch.float64) -> torch.Tensor:
    """Dense causal attention per sequence, from the dense K/V, in `dtype` (float64 by default),
    a few hundred query rows at a time; [num_tokens, num_heads, head_dim]. A sequence with no
    context (seq_len 0, a padding entry) gives zeros."""
    num_tokens, num_heads, head_dim = batch.query.shape
    out = torch.zeros(num_tokens, num_heads, head_dim, dtype=dtype, device=batch.query.device)
    starts = batch.query_start_loc.tolist()
    for s, (k, v) in enumerate(zip(batch.keys, batch.values, strict=True)):
        seq_len, q_len = k.shape[0], batch.q_lens[s]
        if q_len == 0 or seq_len == 0:
            continue
        group = num_heads // k.shape[1]
        k = k.to(dtype).repeat_interleave(group, 1).transpose(0, 1)  # [num_heads, seq_len, D]
        v = v.to(dtype).repeat_interleave(group, 1).transpose(0, 1)
        for lo in range(0, q_len, 512):
            hi = min(q_len, lo + 512)
            q = batch.query[starts[s] + lo : starts[s] + hi].to(dtype).transpose(0, 1)
            scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [num_heads, rows, seq_len]
            q_pos = torch.arange(seq_len - q_len + lo, seq_len - q_len + hi, device=k.device)
            k_pos = torch.arange(seq_len, device=k.device)
            scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            rows = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(0, 1)
            out[starts[s] + lo : starts[s] + hi] = rows
    return out


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """||got - expected|| / ||expected||, in float64."""
    got, expected = got.double(), expected.double()
    return ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def skip_bf16_dot_on_interpreter(device: torch.device, dtype: torch.dtype) -> None:
    """Triton's CPU interpreter (3.9) multiplies bf16 tl.dot operands as raw 16-bit integers;
    bf16 is covered on the GPU (and fp16 exercises the same half-precision path here)."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("the Triton interpreter's tl.dot is wrong for bf16 operands")
