"""Tensor-parallel linear layers. Each rank holds one shard and loads only its slice.

    ColumnParallelLinear   W [out, in] split by rows (outputs):   y_r = x W_r^T       (no comm)
    RowParallelLinear      W [out, in] split by columns (inputs): y = sum_r x_r W_r^T (all-reduce)

A column-parallel layer feeds a row-parallel one (attention: qkv -> o; MLP: gate_up -> down), so
each block needs one all-reduce. Every parameter carries a weight_loader(param, full_tensor,
shard_id) that cuts this rank's slice out of the checkpoint's full tensor.
"""

import torch
import torch.nn.functional as F
from torch import nn

from worker import distributed


def _shard_size(total: int, what: str) -> int:
    tp = distributed.tp_size()
    if total % tp:
        raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={tp}")
    return total // tp


class ColumnParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.out_local = _shard_size(out_features, "output size")
        self.weight = nn.Parameter(torch.empty(self.out_local, in_features))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_local))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        rows = self.out_local
        param.data.copy_(loaded.narrow(0, distributed.tp_rank() * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up): each rank's weight is
    [gate_r; up_r], so the local output splits into local gate and up halves."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        assert isinstance(shard_id, int), "a merged layer loads one part at a time"
        tp, rank = distributed.tp_size(), distributed.tp_rank()
        offset = sum(self.output_sizes[:shard_id]) // tp
        rows = self.output_sizes[shard_id] // tp
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, rank * rows, rows))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V in one matmul. Each rank holds num_heads / tp query heads and
    max(1, num_kv_heads / tp) KV heads; when tp > num_kv_heads, KV heads are replicated:
    rank r holds KV head r * num_kv_heads // tp.

    Local output: [q heads | k heads | v heads], each head head_dim wide.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        tp = distributed.tp_size()
        self.head_dim = head_dim
        self.num_heads_local = _shard_size(num_heads, "num_attention_heads")
        if tp >= num_kv_heads:
            if tp % num_kv_heads:
                raise ValueError(
                    f"tensor_parallel_size={tp} is not a multiple of num_key_value_heads="
                    f"{num_kv_heads}"
                )
            self.num_kv_heads_local = 1
        else:
            self.num_kv_heads_local = _shard_size(num_kv_heads, "num_key_value_heads")
        self.num_kv_heads = num_kv_heads
        local = (self.num_heads_local + 2 * self.num_kv_heads_local) * head_dim
        super().__init__(hidden_size, local * tp, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads_local * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads_local * self.head_dim

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        tp, rank = distributed.tp_size(), distributed.tp_rank()
        if shard_id == "q":
            offset, rows, start = 0, self.q_size, rank * self.q_size
        else:
            kv_head = rank * self.num_kv_heads // tp if tp >= self.num_kv_heads else rank
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            rows, start = self.kv_size, kv_head * self.kv_size
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, start, rows))


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_local = _shard_size(in_features, "input size")
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        cols = self.in_local
        param.data.copy_(loaded.narrow(1, distributed.tp_rank() * cols, cols))

    @staticmethod
    def bias_loader(
        param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, by rank 0, before the sum over ranks.
        bias = self.bias if distributed.tp_rank() == 0 else None
        return distributed.all_reduce(F.linear(x, self.weight, bias))
