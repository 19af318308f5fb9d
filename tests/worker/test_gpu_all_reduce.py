"""On two GPUs: the one-shot symmetric-memory all-reduce is taken where each rank's process sees
both cards, in the same order (as cluster.placement shows them), and sums exactly as NCCL does
(two bf16 addends: one rounding either way), eagerly and as a chain of 64 replayed in a CUDA
graph (each all-reduce's input is the last one's output: a rank writing its next input into
the shared buffer before its peer read the last would show). The same for the all-reduce fused
with the residual add and RMSNorm (its own kernel up to FUSED_MAX_ROWS rows, the two steps
beyond): bit for bit NCCL then kernels.fused_add_rms_norm, eagerly at ragged row counts and in
a replayed graph of 64 chained calls whose row counts change (so the rows' parities differ)."""

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port

pytestmark = pytest.mark.gpu

CHAIN = 64
SIZES = [576, 4096 * 7, 4096 * 256, 4096 * 1024]  # the last beyond the one-shot buffer: NCCL
ROWS = [1, 3, 64, 65, 256, 1, 2]  # 65 and 256: beyond the fused kernel's rows


def _chain(x: torch.Tensor, all_reduce) -> torch.Tensor:
    y = x
    for _ in range(CHAIN):
        y = all_reduce(y.roll(1) * 0.5 + x)
    return y


def _norm_chain(x, residual, reduce_add_norm) -> tuple[torch.Tensor, torch.Tensor]:
    h = x
    for i in range(CHAIN):
        rows = 1 + i % 5  # 1..5 rows: each row's calls, and so its parity, differ
        out, residual = reduce_add_norm(h[:rows] + x[:rows], residual[:rows])
        residual = torch.cat([residual, residual[:1].expand(x.shape[0] - rows, -1)])
        h = torch.cat([out, out[:1].expand(x.shape[0] - rows, -1)]) * 0.5
    return h, residual


def _check_fused(rank: int, device: torch.device, nccl) -> None:
    import kernels
    from worker import distributed

    def two_steps(x, residual, weight):
        return kernels.fused_add_rms_norm(nccl(x.clone()), residual, weight, 1e-5)

    same = torch.Generator(device=device).manual_seed(99)  # the replicated residual stream
    own = torch.Generator(device=device).manual_seed(rank)  # this rank's partial sums
    weight = (torch.randn(4096, device=device, generator=same) * 0.1 + 1).to(torch.bfloat16)
    for rows in ROWS:
        x = torch.randn(rows, 4096, device=device, generator=own).to(torch.bfloat16)
        residual = torch.randn(rows, 4096, device=device, generator=same).to(torch.bfloat16)
        got = distributed.all_reduce_add_rms_norm(x, residual, weight, 1e-5)
        want = two_steps(x, residual, weight)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), rows
    x = torch.randn(5, 4096, device=device, generator=own).to(torch.bfloat16)
    residual = torch.randn(5, 4096, device=device, generator=same).to(torch.bfloat16)

    def fused(h, r):
        return distributed.all_reduce_add_rms_norm(h, r, weight, 1e-5)

    want = _norm_chain(x, residual, lambda h, r: two_steps(h, r, weight))
    _norm_chain(x, residual, fused)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = _norm_chain(x, residual, fused)
    for _ in range(20):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _rank(rank: int, port: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    import torch.distributed as dist

    from worker import distributed

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    distributed.init(rank, 2, "127.0.0.1", port)
    try:
        assert distributed.enable_small_all_reduce(torch.bfloat16, device)
        kind = distributed.all_reduce_kind()
        assert kind.startswith("fused with RMSNorm") and "symmetric-memory one-shot" in kind

        def nccl(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

        gen = torch.Generator(device=device).manual_seed(rank)
        for numel in SIZES:
            x = torch.randn(numel, device=device, generator=gen).to(torch.bfloat16)
            assert torch.equal(distributed.all_reduce(x.clone()), nccl(x.clone())), numel
        x = torch.randn(4096, device=device, generator=gen).to(torch.bfloat16)
        want = _chain(x, nccl)
        _chain(x, distributed.all_reduce)  # warm-up outside the graph
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = _chain(x, distributed.all_reduce)
        for _ in range(20):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(got, want)
        _check_fused(rank, device, nccl)
    finally:
        distributed.destroy()


def test_one_shot_all_reduce_equals_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    port = free_port()
    context = mp.start_processes(_rank, args=(port,), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 180 s")
