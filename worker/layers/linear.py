"""Tensor-parallel linear layers. Each rank holds one shard and loads only its slice.

    ColumnParallelLinear   W [out, in] split by rows (outputs):   y_r = x W_r^T       (no comm)
    RowParallelLinear      W [out, in] split by columns (inputs): y = sum_r x_r W_r^T (all-reduce)

A column-parallel layer feeds a row-parallel one (attention: qkv -> o; MLP: gate_up -> down), so
each block needs one all-reduce. Every parameter carries a weight_loader(param, full_tensor,
shard_id) that cuts this rank's slice out of the checkpoint's full tensor.
"""

import logging

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from worker import distributed

log = logging.getLogger(__name__)

# x W^T for a few rows of x (a decode step's batch) on the CPU: MKL's sgemm takes it several
# times slower (2-4 rows: 2-3x for the MLP and the LM head) than the same product taken as
# W x^T, which streams W once for all rows. From 64 rows on the two run alike.
_CPU_FEW_ROWS = 64


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    one_row: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias). A float32 x of 2 .. 64 rows on the CPU is computed as
    (weight @ x^T)^T: the same sums, rounded to within float32's last bits of F.linear's
    (whose few-row path rounds differently from its one-row path anyway). A one-row x on CUDA
    goes to the Triton GEMV when the layer chose it (one_row: its config, choose_one_row)."""
    rows = x.shape[0] if x.dim() == 2 else 0
    if one_row is not None and rows == 1 and x.is_cuda:
        return kernels.gemv(x, weight, bias, one_row)
    if x.is_cuda or x.dtype != torch.float32 or not 1 < rows <= _CPU_FEW_ROWS:
        return F.linear(x, weight, bias)
    out = torch.mm(weight, x.t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous()


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
        self.one_row: tuple[int, int, int] | None = None  # the GEMV config, choose_one_row
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
        return linear(x, self.weight, self.bias, self.one_row)


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


class QKVParallelLinear(nn.Module):
    """Q, K and V in one matmul, split by KV head groups (a query head stays with its KV head).

    With tp <= num_kv_heads, rank r holds the contiguous KV heads
    [r * K // tp, (r + 1) * K // tp) and their query heads, so head counts need not divide:
    9 query / 3 KV heads over 2 ranks gives ranks 3 + 6 query heads, 1 + 2 KV heads. With
    tp > num_kv_heads (a multiple of it), each KV head is replicated on tp / K ranks, which
    share its query heads evenly.

    Local output: [q heads | k heads | v heads], each head head_dim wide.
    """

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        super().__init__()
        tp, rank = distributed.tp_size(), distributed.tp_rank()
        group = num_heads // num_kv_heads
        if tp <= num_kv_heads:
            kv_start, kv_end = rank * num_kv_heads // tp, (rank + 1) * num_kv_heads // tp
            self.q_start, self.num_heads_local = kv_start * group, (kv_end - kv_start) * group
            self.kv_start, self.num_kv_heads_local = kv_start, kv_end - kv_start
        else:
            replicas = tp // num_kv_heads
            if tp % num_kv_heads or group % replicas:
                raise ValueError(
                    f"tensor_parallel_size={tp} cannot split {num_heads} query heads over "
                    f"{num_kv_heads} KV heads"
                )
            self.kv_start, self.num_kv_heads_local = rank // replicas, 1
            self.num_heads_local = group // replicas
            self.q_start = self.kv_start * group + (rank % replicas) * self.num_heads_local
        self.head_dim = head_dim
        local = (self.num_heads_local + 2 * self.num_kv_heads_local) * head_dim
        self.weight = nn.Parameter(torch.empty(local, hidden_size))
        self.one_row: tuple[int, int, int] | None = None  # the GEMV config, choose_one_row
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(local))
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    @property
    def q_size(self) -> int:
        return self.num_heads_local * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads_local * self.head_dim

    @property
    def q_shard(self) -> tuple[int, int]:
        """(offset, size) of this rank's query heads in the full attention output."""
        return self.q_start * self.head_dim, self.q_size

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if shard_id == "q":
            offset, rows, start = 0, self.q_size, self.q_start * self.head_dim
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            rows, start = self.kv_size, self.kv_start * self.head_dim
        param.data.narrow(0, offset, rows).copy_(loaded.narrow(0, start, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.one_row)


class RowParallelLinear(nn.Module):
    """input_shard: (offset, size) of this rank's input columns when they are not an even split
    (attention's output projection follows the query heads of QKVParallelLinear.q_shard).
    reduce_results False: forward returns this rank's part of the output, for a caller that
    sums it over the ranks itself (distributed.all_reduce_add_rms_norm)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        input_shard: tuple[int, int] | None = None,
        reduce_results: bool = True,
    ) -> None:
        super().__init__()
        self.reduce_results = reduce_results
        if input_shard is None:
            size = _shard_size(in_features, "input size")
            input_shard = (distributed.tp_rank() * size, size)
        self.in_offset, self.in_local = input_shard
        self.weight = nn.Parameter(torch.empty(out_features, self.in_local))
        self.one_row: tuple[int, int, int] | None = None  # the GEMV config, choose_one_row
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
            self.bias.weight_loader = self.bias_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        param.data.copy_(loaded.narrow(1, self.in_offset, self.in_local))

    @staticmethod
    def bias_loader(
        param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias is added once, by rank 0, before the sum over ranks.
        bias = self.bias if distributed.tp_rank() == 0 else None
        out = linear(x, self.weight, bias, self.one_row)
        return distributed.all_reduce(out) if self.reduce_results else out


def choose_one_row(model: nn.Module) -> int:
    """For a batch-1 decode step: on CUDA, each linear layer with a half-precision weight takes
    the Triton GEMV (kernels.gemv) where it beats cuBLAS on that weight (timed once per weight
    shape, here: before the decode graphs are captured). Returns how many layers take it."""
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear))
        and m.weight.is_cuda
        and m.weight.dtype in (torch.float16, torch.bfloat16)
    ]
    chosen: dict[tuple[int, int, torch.dtype], tuple[int, int, int] | None] = {}
    for layer in layers:
        key = (*layer.weight.shape, layer.weight.dtype)
        if key not in chosen:
            try:
                chosen[key] = kernels.choose_gemv(layer.weight)
            except Exception as e:  # a Triton or driver failure: cuBLAS serves as before
                log.warning("batch-1 GEMV not timed for %s (cuBLAS serves it): %s", key, e)
                chosen[key] = None
        layer.one_row = chosen[key]
    if layers:
        torch.cuda.empty_cache()  # the timing's copies of the weights
    return sum(layer.one_row is not None for layer in layers)
