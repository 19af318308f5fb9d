"""The tensor-parallel group of this worker process: one replica's ranks, one process each.

NCCL on CUDA, gloo on CPU. With a single rank every collective is the identity, so the same
model code serves tensor-parallel and single-device use.

Small all-reduces on CUDA (a decode step's activations: up to SMALL_ALL_REDUCE_BYTES) take
torch's symmetric-memory one-shot all-reduce when the ranks' GPUs reach each other's memory
(NVLink P2P; never multicast): each rank reads every peer's buffer directly, one kernel, no
NCCL protocol. It is set up by enable_small_all_reduce, checked against NCCL once, and falls
back to NCCL wherever it is unavailable. Both can be captured in CUDA graphs.
"""

import logging
import warnings

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SMALL_ALL_REDUCE_BYTES = 1 << 20

_rank = 0
_world_size = 1
_small: "_SymmetricAllReduce | None" = None


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
    global _small
    _small = None
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the ranks; returns the sum (x itself, or a new tensor)."""
    if _world_size == 1:
        return x
    if _small is not None and _small.fits(x):
        return _small(x)
    dist.all_reduce(x)
    return x


class _SymmetricAllReduce:
    """One-shot all-reduce through a symmetric-memory buffer of SMALL_ALL_REDUCE_BYTES."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.capacity = SMALL_ALL_REDUCE_BYTES // torch.tensor([], dtype=dtype).element_size()
        self.group_name = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.12
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.capacity, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.capacity and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[: x.numel()]
        staged.copy_(x.view(-1))
        out = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
        return out.view(x.shape)


def enable_small_all_reduce(dtype: torch.dtype, device: torch.device) -> bool:
    """Sets up the one-shot all-reduce for small tensors of dtype (every rank together); True
    if it is used, False if unavailable (NCCL then serves every all-reduce)."""
    global _small
    if _small is not None and _small.dtype == dtype:
        return True
    _small = None
    if _world_size == 1 or device.type != "cuda":
        return False
    try:
        small = _SymmetricAllReduce(dtype, device)
        probe = torch.arange(4096, device=device, dtype=torch.float32).mul_(_rank + 1).to(dtype)
        want = probe.clone()
        dist.all_reduce(want)
        ok = torch.equal(small(probe), want)
    except Exception as e:  # an older torch, no P2P between the GPUs, ...
        log.warning("symmetric-memory all-reduce unavailable, NCCL serves all: %s", e)
        return False
    agreed = torch.tensor([int(ok)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if agreed.item():
        _small = small
    else:
        log.warning("symmetric-memory all-reduce disagreed with NCCL: NCCL serves all")
    return _small is not None


def gather_to_rank0(x: torch.Tensor) -> torch.Tensor | None:
    """Concatenates every rank's x along the last dim on rank 0; other ranks get None."""
    if _world_size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(_world_size)] if _rank == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if _rank == 0 else None


def broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's x on every rank (in place)."""
    if _world_size > 1:
        dist.broadcast(x, src=0)
    return x
