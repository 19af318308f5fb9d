"""The tensor-parallel group of this worker process: one replica's ranks, one process each.

NCCL on CUDA, gloo on CPU. With a single rank every collective is the identity, so the same
model code serves tensor-parallel and single-device use.

Small all-reduces on CUDA (a decode step's activations: up to SMALL_ALL_REDUCE_BYTES) take
torch's symmetric-memory one-shot all-reduce when the ranks' GPUs can map each other's memory
(NVLink P2P; never multicast): each rank copies its part into its buffer, then reads every
peer's buffer directly, one kernel with a barrier on entry and exit, no NCCL protocol. It needs
every rank's GPU visible in every rank's process (cluster/actors.py arranges it: Ray shows each
worker its own card only). enable_small_all_reduce sets it up, checks it against NCCL once and
leaves NCCL serving every all-reduce wherever it is unavailable. Both are captured in graphs.

The all-reduce of a row-parallel layer's output that a residual add and RMSNorm follow (twice a
Llama layer) takes all_reduce_add_rms_norm: at up to FUSED_MAX_ROWS rows, on the same mapped
memory, one Triton kernel sums, adds and norms (kernels.triton_all_reduce_rms_norm: one barrier
per call, no exit barrier); otherwise the all-reduce above, then the fused add and norm.
"""

import logging
import warnings

import torch
import torch.distributed as dist

import kernels

log = logging.getLogger(__name__)

SMALL_ALL_REDUCE_BYTES = 4 << 20  # a decode step of 256 sequences of 4096 bf16 is 2 MiB
FUSED_MAX_ROWS = 64  # all_reduce_add_rms_norm's one kernel: decode steps of up to 64 sequences
FUSED_SLOT_ELEMS = 1 << 18  # and rows * hidden up to this: 64 rows of 4096

_rank = 0
_world_size = 1
_small: "_SymmetricAllReduce | None" = None
_fused: "_FusedAllReduceNorm | None" = None


def init(
    rank: int, world_size: int, master_addr: str, master_port: int, store_path: str = ""
) -> None:
    """Joins the replica's group. The ranks meet through store_path, a file in a private
    directory, when they share a node (torch's FileStore: nothing listens), else through the
    TCP store rank 0 serves at master_addr:master_port, which any host that reaches the port
    could talk to: only a replica that spans nodes needs it."""
    global _rank, _world_size
    _rank, _world_size = rank, world_size
    if world_size > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        where = f"file://{store_path}" if store_path else f"tcp://{master_addr}:{master_port}"
        dist.init_process_group(backend, init_method=where, rank=rank, world_size=world_size)


def destroy() -> None:
    global _small, _fused
    _small = _fused = None
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return _rank


def tp_size() -> int:
    return _world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums x over the ranks; returns the sum (x itself, summed in place, or a new tensor)."""
    if _world_size == 1:
        return x
    if _small is not None and _small.fits(x):
        return _small(x)
    dist.all_reduce(x)
    return x


def all_reduce_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(s + residual), s + residual) where s is the sum of x over the ranks: a
    row-parallel layer's output [num_tokens, hidden], this rank's part, summed, added to the
    residual stream and normed (kernels.fused_add_rms_norm's contract)."""
    if _fused is not None and _fused.fits(x, residual):
        return _fused(x, residual, weight, eps)
    return kernels.fused_add_rms_norm(all_reduce(x), residual, weight, eps)


def all_reduce_kind() -> str:
    """How all_reduce sums: "" with one rank, else the paths it takes, smallest messages first."""
    if _world_size == 1:
        return ""
    if _small is None:
        return "nccl"
    fused = f"fused with RMSNorm <= {FUSED_MAX_ROWS} rows, " if _fused is not None else ""
    return f"{fused}symmetric-memory one-shot <= {SMALL_ALL_REDUCE_BYTES >> 20} MiB, nccl"


class _SymmetricAllReduce:
    """One-shot all-reduce through a symmetric-memory buffer of SMALL_ALL_REDUCE_BYTES.

    The buffer is reused by every call: the kernel's exit barrier keeps a rank from writing
    its next input there before every peer has read the current one."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.dtype = dtype
        self.capacity = SMALL_ALL_REDUCE_BYTES // torch.tensor([], dtype=dtype).element_size()
        self.group_name = dist.group.WORLD.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required before torch 2.12
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.capacity, dtype=dtype, device=device)  # [capacity]
        symm_mem.rendezvous(self.buffer, self.group_name)

    def fits(self, x: torch.Tensor) -> bool:
        # The kernel reads 16 bytes at a time: sizes that are multiples of 16 bytes only.
        nbytes = x.numel() * x.element_size()
        return (
            x.dtype == self.dtype
            and x.numel() <= self.capacity
            and nbytes % 16 == 0
            and x.is_contiguous()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[: x.numel()]
        return torch.ops.symm_mem.one_shot_all_reduce_copy(
            staged, x.view(-1), "sum", self.group_name
        ).view(x.shape)


class _FusedAllReduceNorm:
    """all_reduce_add_rms_norm's one kernel over a symmetric buffer of its own, each rank's copy
    laid out as kernels.triton_all_reduce_rms_norm describes; every rank fills its copy with
    negative zeros and zeroes its epochs before any rank pushes (the barrier in __init__)."""

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        from kernels.triton_all_reduce_rms_norm import buffer_bytes, fill_negative_zeros

        self.dtype = dtype
        group_name = dist.group.WORLD.group_name
        nbytes = buffer_bytes(_world_size, FUSED_SLOT_ELEMS, dtype)
        self.buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        fill_negative_zeros(self.buffer, dtype)
        handle = symm_mem.rendezvous(self.buffer, group_name)
        self.buffer_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.epochs = torch.zeros(FUSED_MAX_ROWS, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        dist.barrier()

    def fits(self, x: torch.Tensor, residual: torch.Tensor) -> bool:
        return (
            x.dim() == 2
            and x.dtype == self.dtype
            and x.shape[0] <= FUSED_MAX_ROWS
            and x.numel() <= FUSED_SLOT_ELEMS
            and x.stride(1) == 1
            and residual.stride(1) == 1
        )

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from kernels.triton_all_reduce_rms_norm import all_reduce_add_rms_norm

        return all_reduce_add_rms_norm(
            x,
            residual,
            weight,
            eps,
            buffer_ptrs=self.buffer_ptrs,
            epochs=self.epochs,
            rank=_rank,
            slot_elems=FUSED_SLOT_ELEMS,
        )


def _fused_agrees(fused: _FusedAllReduceNorm, device: torch.device) -> bool:
    """The fused kernel against the all-reduce then the fused add and norm, on a probe."""
    gen = torch.Generator(device=device).manual_seed(_rank)
    x = torch.randn(3, 4096, device=device, generator=gen).to(fused.dtype)
    residual = torch.ones(3, 4096, device=device, dtype=fused.dtype)
    weight = torch.full((4096,), 0.5, device=device, dtype=fused.dtype)
    got = fused(x, residual, weight, 1e-6)
    summed = x.clone()
    dist.all_reduce(summed)
    want = kernels.fused_add_rms_norm(summed, residual, weight, 1e-6)
    return all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def enable_small_all_reduce(dtype: torch.dtype, device: torch.device) -> bool:
    """Sets up the one-shot all-reduce for small tensors of dtype, and the all-reduce fused with
    RMSNorm (every rank together); True if they are used, False if unavailable (NCCL then serves
    every all-reduce)."""
    global _small, _fused
    if _small is not None and _small.dtype == dtype:
        return True
    _small = _fused = None
    if _world_size == 1 or device.type != "cuda":
        return False
    small = fused = None
    try:
        small = _SymmetricAllReduce(dtype, device)
        probe = torch.arange(4096, device=device, dtype=torch.float32).mul_(_rank + 1).to(dtype)
        want = probe.clone()
        dist.all_reduce(want)
        fused = _FusedAllReduceNorm(dtype, device)
        ok = torch.equal(small(probe), want) and _fused_agrees(fused, device)
    except Exception as e:  # an older torch, GPUs that cannot map each other's memory, ...
        log.warning("symmetric-memory all-reduce unavailable, NCCL serves all: %s", e)
        ok = False
    # Every rank takes the same path, or the ranks would wait on different collectives.
    agreed = torch.tensor([int(ok)], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    if agreed.item():
        _small, _fused = small, fused
    elif ok:
        log.warning("a peer cannot use the symmetric-memory all-reduce: NCCL serves all")
    return _small is not None


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
