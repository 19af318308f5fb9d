"""Paged attention over a ragged batch: prefill, chunked prefill and decode in one call.

Memory layout (one layer, one rank):

    key_cache / value_cache   [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables              [num_seqs, max_blocks_per_seq]   block ids; the tail is padding
    slot of position p        block_tables[s, p // block_size] * block_size + p % block_size

    query                     [num_tokens, num_heads, head_dim]   the new tokens of every sequence,
                              sequence s owns rows query_start_loc[s] : query_start_loc[s + 1]

The K/V of this step's tokens are already in the cache (kernels.write_kv_cache runs first), so a
sequence of context length L = seq_lens[s] with q new tokens has its queries at positions
L - q .. L - 1, and query i attends causally to keys 0 .. L - q + i. Query head h reads KV head
h // (num_heads // num_kv_heads) (grouped-query attention).
"""

from collections.abc import Callable

import torch

# Decode sequences attend together, in groups of like lengths padded to the longest of the
# group: a group grows while its longest is at most twice its shortest plus this many tokens.
_DECODE_GROUP_SLACK = 64

# (q [n, num_heads, head_dim], k, v [n, length, num_kv_heads, head_dim], attend [n, length]
# bool: the positions each query sees, scale) -> [n, num_heads, head_dim]
DecodeMath = Callable[..., torch.Tensor]
# (q [q_len, num_heads, head_dim], k, v [seq_len, num_kv_heads, head_dim], scale), causal,
# the queries the last q_len positions -> [q_len, num_heads, head_dim]
SequenceMath = Callable[..., torch.Tensor]


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference; returns [num_tokens, num_heads, head_dim] in query's dtype."""
    return attend_paged(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        decode_math=_decode_math,
        sequence_math=_sequence_math,
    )


def attend_paged(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    decode_math: DecodeMath,
    sequence_math: SequenceMath,
) -> torch.Tensor:
    """The paging around an attention's math, in torch (the reference's, and the CPU path's).

    Sequences with one new token (decode) go a group of like lengths at a time: their K/V
    gathered whole blocks at a time to the group's longest, the positions past a sequence's
    end zeroed (whatever the cache holds there, NaN included, cannot reach the output) and
    masked. The others go one at a time over their own context. A token with no context
    (seq_len 0: a padding entry) gets zeros."""
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decode = []  # (seq_len, sequence), shortest first
    for s, seq_len in enumerate(lens):
        if starts[s + 1] - starts[s] == 1:
            if seq_len > 0:
                decode.append((seq_len, s))
            else:
                out[starts[s]] = 0
    decode.sort()
    first = 0
    for i in range(len(decode)):
        if i + 1 == len(decode) or decode[i + 1][0] > 2 * decode[first][0] + _DECODE_GROUP_SLACK:
            group = decode[first : i + 1]
            _decode_group(
                query, key_cache, value_cache, block_tables, starts, group, scale, out, decode_math
            )
            first = i + 1
    block_size = key_cache.shape[1]
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        if q_end - q_start > 1:
            blocks = block_tables[s, : (seq_len + block_size - 1) // block_size].long()
            k = _gather(key_cache, blocks, 1)[0, :seq_len]
            v = _gather(value_cache, blocks, 1)[0, :seq_len]
            out[q_start:q_end] = sequence_math(query[q_start:q_end], k, v, scale)
    return out


def _gather(cache: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    """The blocks' rows of cache, one copy each (index_select), as [n, -1, kv_heads, dim]."""
    _, _, num_kv_heads, head_dim = cache.shape
    return cache.index_select(0, blocks.flatten()).view(n, -1, num_kv_heads, head_dim)


def _decode_group(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: list[int],
    group: list[tuple[int, int]],
    scale: float,
    out: torch.Tensor,
    decode_math: DecodeMath,
) -> None:
    """The one new token of each (seq_len, sequence) of group (ascending seq_len), into out."""
    block_size = key_cache.shape[1]
    device = query.device
    n, max_len = len(group), group[-1][0]
    in_order = n == block_tables.shape[0] and starts[-1] == n  # every sequence, all decode
    if in_order:
        group = sorted(group, key=lambda entry: entry[1])
    seqs = [s for _, s in group]
    tables = block_tables if in_order else block_tables[torch.tensor(seqs, device=device)]
    blocks = tables[:, : (max_len + block_size - 1) // block_size].long()
    k = _gather(key_cache, blocks, n)  # [n, whole blocks, num_kv_heads, head_dim], a copy
    v = _gather(value_cache, blocks, n)
    lens = torch.tensor([seq_len for seq_len, _ in group], device=device)
    attend = torch.arange(k.shape[1], device=device)[None, :] < lens[:, None]
    past_end = (~attend).flatten().nonzero().squeeze(1)  # rows of [n * whole blocks]
    k.view(-1, k.shape[2] * k.shape[3]).index_fill_(0, past_end, 0)
    v.view(-1, v.shape[2] * v.shape[3]).index_fill_(0, past_end, 0)
    rows = None if in_order else torch.tensor([starts[s] for s in seqs], device=device)
    attended = decode_math(query if rows is None else query[rows], k, v, attend, scale)
    if rows is None:
        out.copy_(attended)
    else:
        out[rows] = attended


def _decode_math(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: torch.Tensor, scale: float
) -> torch.Tensor:
    """Scores, softmax and weighted sum in float32. Query head h reads KV head
    h // (num_heads // num_kv_heads): q as [n, num_kv_heads, group, head_dim]."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    grouped = q.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = torch.matmul(grouped, k.permute(0, 2, 3, 1).float()) * scale  # [n, kv, g, length]
    scores.masked_fill_(~attend[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attended = torch.matmul(probs, v.transpose(1, 2).float())  # [n, kv, group, head_dim]
    return attended.reshape(n, num_heads, head_dim).to(q.dtype)


def _sequence_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One sequence's q_len new tokens over its seq_len keys, causal, in float32."""
    q_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # [seq_len, num_kv_heads, head_dim] -> [num_heads, seq_len, head_dim]
    k = k.transpose(0, 1).repeat_interleave(group, dim=0).float()
    v = v.transpose(0, 1).repeat_interleave(group, dim=0).float()
    scores = torch.matmul(q.transpose(0, 1).float(), k.transpose(1, 2)) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [num_heads, q_len, seq_len]
    return torch.matmul(probs, v).transpose(0, 1).to(q.dtype)
