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
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q_start, q_end = starts[s], starts[s + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        num_blocks = (seq_len + block_size - 1) // block_size
        blocks = block_tables[s, :num_blocks].long()
        # [seq_len, num_kv_heads, head_dim] -> [num_heads, seq_len, head_dim]
        k = key_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        v = value_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len]
        k = k.transpose(0, 1).repeat_interleave(group, dim=0).float()
        v = v.transpose(0, 1).repeat_interleave(group, dim=0).float()
        q = query[q_start:q_end].transpose(0, 1).float()  # [num_heads, q_len, head_dim]
        scores = torch.matmul(q, k.transpose(1, 2)) * scale  # [num_heads, q_len, seq_len]
        q_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)
        k_pos = torch.arange(seq_len, device=query.device)
        scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[q_start:q_end] = torch.matmul(probs, v).transpose(0, 1).to(query.dtype)
    return out
