"""Vocab-parallel embedding and LM head: rank r holds rows [r * shard, (r + 1) * shard) of the
vocabulary (shard = ceil(vocab / tp), the last shard padded with zero rows)."""

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from worker import distributed
from worker.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, embedding_dim: int) -> None:
        super().__init__()
        tp = distributed.tp_size()
        self.vocab_size = vocab_size
        self.shard = -(-vocab_size // tp)
        self.start = distributed.tp_rank() * self.shard
        self.weight = nn.Parameter(torch.empty(self.shard, embedding_dim))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        rows = max(min(self.shard, self.vocab_size - self.start), 0)
        param.data.zero_()
        param.data[:rows].copy_(loaded.narrow(0, self.start, rows))

    def local(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [num_tokens] -> this rank's part of their embedding [num_tokens, dim]: the
        rows of its ids, zeros for the other ranks' (summed over the ranks: forward)."""
        if distributed.tp_size() == 1:
            return F.embedding(input_ids, self.weight)
        return kernels.shard_embedding(input_ids, self.weight, self.start)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return distributed.all_reduce(self.local(input_ids))


class ParallelLMHead(VocabParallelEmbedding):
    def __init__(self, vocab_size: int, embedding_dim: int, bias: bool = False) -> None:
        super().__init__(vocab_size, embedding_dim)
        if vocab_size >= 1 << 24:  # greedy() carries ids in float32
            raise ValueError(f"a vocabulary of {vocab_size} tokens is beyond 2**24")
        if bias:
            self.bias = nn.Parameter(torch.empty(self.shard))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_rows, dim] -> this rank's logits [num_rows, shard], the model's dtype
        (the last shard's padding columns hold 0)."""
        return linear(hidden, self.weight, self.bias)

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """Every rank's local_logits -> float32 logits [num_rows, vocab] on rank 0, None
        elsewhere."""
        logits = distributed.gather_to_rank0(local)
        return None if logits is None else logits[:, : self.vocab_size].float()

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [num_rows, dim] -> float32 logits [num_rows, vocab] on rank 0, None elsewhere."""
        return self.gather_logits(self.local_logits(hidden))

    def greedy(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's local_logits -> each row's argmax over the vocabulary [num_rows] int64,
        on every rank: the lowest id among equal maxima, as argmax of gather_logits. The
        logits are never gathered: each rank's best, then one all-gather of the pairs."""
        if self.start >= self.vocab_size:  # this rank's shard is all padding
            values = local.new_full(local.shape[:1], float("-inf"))
            ids = torch.zeros(local.shape[:1], dtype=torch.int64, device=local.device)
        else:
            values, ids = kernels.row_max(local[:, : self.vocab_size - self.start])
        return distributed.argmax_over_ranks(values, ids + self.start)
