"""The tensor-parallel group of this worker process: one replica's ranks, one process each.

NCCL on CUDA, gloo on CPU. With a single rank every collective is the identity, so the same
model code serves tensor-parallel and single-device use.
"""

import torch
import torch.distributed as dist

_rank = 0
_world_size = 1


def init(rank: int, world_size: int, master_addr: str, master_port: int) -> None:
    global _rank, _world_size
    _rank, _world_size = rank, world_size
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=rank,
            world_size=world_size,
        )


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the ranks, in place."""
    if _world_size > 1:
        dist.all_reduce(x)
    return x


def gather_to_rank0(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenates every rank's x along the last dim on rank 0; other ranks get None."""
    if _world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_world_size)] if _rank == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if _rank == 0 else None


def argmax_over_ranks(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, of each rank's best (value, id), the id with the largest value, the lowest
    rank's among equal ones; the same on every rank. values [rows] float, ids [rows] int64,
    below 2**24 (exact in float32). One all-gather of the pairs: graph-capturable."""
    if _world_size == 1:
        return ids
    pairs = torch.stack([values.float(), ids.float()]).flatten()  # [2 * rows]
    gathered = pairs.new_empty(_world_size * pairs.numel())
    dist.all_gather_into_tensor(gathered, pairs)
    gathered = gathered.view(_world_size, 2, -1)  # [rank, (value, id), rows]
    best = gathered[:, 0].argmax(dim=0, keepdim=True)  # [1, rows]: the rank; ties the lowest
    return gathered[:, 1].gather(0, best)[0].long()


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank (in place)."""
    if _world_size > 1:
        dist.broadcast(x, src=0)
    return x
