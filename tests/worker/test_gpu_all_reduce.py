"""On two GPUs: the one-shot symmetric-memory all-reduce is taken where each rank's process sees
both cards, in the same order (as cluster.placement shows them), and sums exactly as NCCL does
(two bf16 addends: one rounding either way), eagerly and as a chain of 64 replayed in a CUDA
graph (each all-reduce's input is the last one's output: a rank writing its next input into
the shared buffer before its peer read the last would show)."""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.gpu

CHAIN = 64
SIZES = [576, 4096 * 7, 4096 * 256, 4096 * 1024]  # the last beyond the one-shot buffer: NCCL


def _chain(x: torch.Tensor, all_reduce) -> torch.Tensor:
    y = x
    for _ in range(CHAIN):
        y = all_reduce(y.roll(1) * 0.5 + x)
    return y


def _rank(rank: int, port: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = "0,1"
    import torch.distributed as dist

    from worker import distributed

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    distributed.init(rank, 2, "127.0.0.1", port)
    try:
        assert distributed.enable_small_all_reduce(torch.bfloat16, device)
        assert distributed.all_reduce_kind().startswith("symmetric-memory one-shot")

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
    finally:
        distributed.destroy()


def test_one_shot_all_reduce_equals_nccl():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_rank, args=(port,), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the two ranks did not finish within 180 s")
