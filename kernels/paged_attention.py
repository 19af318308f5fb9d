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

import torch

# Decode sequences attend together, in groups of like lengths padded to the longest of the
# group: a group grows while its longest is at most twice its shortest plus this many tokens.
_DECODE_GROUP_SLACK = 64


def paged_attention_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain-torch reference; returns [num_tokens, num_heads, head_dim] in query's dtype.

    Sequences with one new token (decode) are computed a group of like lengths at a time
    (_decode_group), the others one by one (_attend_one): the same attention, in float32. A
    token with no context (seq_len 0: a padding entry) gets zeros."""
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
            _decode_group(query, key_cache, value_cache, block_tables, starts, group, scale, out)
            first = i + 1
    for s, seq_len in enumerate(lens):
        q_start, q_end = starts[s], starts[s + 1]
        if q_end - q_start > 1:
            out[q_start:q_end] = _attend_one(
                query[q_start:q_end], key_cache, value_cache, block_tables[s], seq_len, scale
            )
    return out


def _attend_one(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """One sequence's q_len new tokens [q_len, num_heads, head_dim], causal over its context."""
    q_len, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    # [seq_len, num_kv_heads, head_dim] -> [num_heads, seq_len, head_dim]
    k = key_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:seq_len]
    v = value_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:seq_len]
    k = k.transpose(0, 1).repeat_interleave(group, dim=0).float()
    v = v.transpose(0, 1).repeat_interleave(group, dim=0).float()
    scores = torch.matmul(q.transpose(0, 1).float(), k.transpose(1, 2)) * scale
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    k_pos = torch.arange(seq_len, device=q.device)
    scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [num_heads, q_len, seq_len]
    return torch.matmul(probs, v).transpose(0, 1).to(q.dtype)


def _decode_group(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    starts: list[int],
    group: list[tuple[int, int]],
    scale: float,
    out: torch.Tensor,
) -> None:
    """The one new token of each (seq_len, sequence) of group, ascending seq_len, over its
    context; written into out. K/V are gathered as [n, max_len] (max_len: the group's longest)
    and the positions past a sequence's end masked: their scores -inf, their values zeroed, so
    that whatever the cache holds there (NaN included) cannot reach the output. Query head h
    reads KV head h // (num_heads // num_kv_heads): q as [n, num_kv_heads, group, head_dim]."""
    _, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    device = query.device
    n, max_len = len(group), group[-1][0]
    num_blocks = (max_len + block_size - 1) // block_size
    in_order = n == block_tables.shape[0] and starts[-1] == n  # every sequence, all decode
    if in_order:
        group = sorted(group, key=lambda entry: entry[1])
    seqs = [s for _, s in group]
    tables = block_tables if in_order else block_tables[torch.tensor(seqs, device=device)]
    blocks = tables[:, :num_blocks].flatten().long()  # index_select: a row copy per block
    k = key_cache.index_select(0, blocks).view(n, -1, num_kv_heads, head_dim)[:, :max_len]
    v = value_cache.index_select(0, blocks).view(n, -1, num_kv_heads, head_dim)[:, :max_len]
    lens = torch.tensor([seq_len for seq_len, _ in group], device=device)
    past_end = torch.arange(max_len, device=device)[None, :] >= lens[:, None]  # [n, max_len]
    v = v.masked_fill(past_end[:, :, None, None], 0)
    rows = None if in_order else torch.tensor([starts[s] for s in seqs], device=device)
    q = query if rows is None else query[rows]
    q = q.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    k = k.permute(0, 2, 3, 1).float()  # [n, num_kv_heads, head_dim, max_len]
    scores = torch.matmul(q, k) * scale  # [n, num_kv_heads, group, max_len]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    attended = torch.matmul(probs, v.transpose(1, 2).float())  # [n, num_kv_heads, group, dim]
    attended = attended.reshape(n, num_heads, head_dim).to(query.dtype)
    if rows is None:
        out.copy_(attended)
    else:
        out[rows] = attended
