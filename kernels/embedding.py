"""A vocab-parallel embedding's lookup on one rank: the torch reference (the CPU path, and the
ground truth for kernels.triton_embedding).

    ids    [num_tokens] int64, global token ids
    weight [shard, hidden]: the rows of ids start .. start + shard - 1
    out    [num_tokens, hidden]: weight[id - start] where the id is this rank's, else zeros

Summed over the ranks, the outputs are the whole embedding (each id is exactly one rank's).
"""

import torch
import torch.nn.functional as F


def shard_embedding_ref(ids: torch.Tensor, weight: torch.Tensor, start: int) -> torch.Tensor:
    """ids [num_tokens] -> this rank's part of their embedding [num_tokens, hidden]."""
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])
    out = F.embedding(local.masked_fill(outside, 0), weight)
    return out.masked_fill_(outside.unsqueeze(-1), 0)
