"""The decode step of one worker, without the engine: where a step's time goes on the device.

    python -m cluster.benchmarks.worker_step --model llama-3-8b --batch-size 1 64 256 \
        [--context-len 256] [--steps 200] [--dtype bfloat16] [--enforce-eager] [--profile] \
        [--tensor-parallel-size 2] [--prompt-len 128] [--sampling greedy|random|top-p|penalized]

Loads a model (a dummy preset, or a checkpoint) into a ModelRunner on this process's GPU (with
--tensor-parallel-size N: N processes, rank r on GPU r, its shard, in one group as a replica's
workers are), puts batch-size requests of context-len tokens in its KV cache, then for each
batch size measures (rank 0's figures; every rank runs the same steps):

    graph      one replay of the captured decode graph, back to back (CUDA events): the step's
               device time with no host in the way
    step       the worker's own loop, as WorkerService runs it with the next plan waiting:
               launch(plan N+1), then finish(step N); wall time per step
    roofline   the weights one step reads (one rank's shard) over the card's copy bandwidth
               (measured here)

step - graph is what the worker's host work and the work outside the graph (sampling) add;
the engine's own time per step is bench latency's step minus this step. With --prompt-len N
every decode step also prefills a new request's N-token prompt (finished the step after), as a
step under steady arrivals does: its rows are the batch plus N, so it replays a graph only while
they fit the largest (model_runner.GRAPH_PROMPT_ROWS), and its graph column is then omitted;
a step that does not replays the piecewise graphs (worker.piecewise_graph) unless eager.
Every request samples as --sampling says (report.SAMPLING's presets; greedy by default).
--profile prints the kernels of one graph replay where the decodes alone replay one and sample
greedily, else (--prompt-len, --enforce-eager, another preset: its sampling runs after the
graph) the kernels and the host calls of the steps themselves.
"""

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

from cluster.benchmarks.report import (
    SAMPLING,
    add_sampling_argument,
    measure_copy_bandwidth,
    roofline_ms,
)
from cluster.models import resolve_model
from protos import worker_pb2
from worker import distributed
from worker.loader import load_model
from worker.model_runner import ModelRunner

BLOCK_SIZE = 16


def decode_plans(
    batch: int,
    context_len: int,
    steps: int,
    first_block: int,
    prompt_len: int = 0,
    vocab: int = 1000,
    sampling: str = "greedy",
) -> list:
    """A prefill plan of batch requests of context_len random tokens, then `steps` decode plans
    (each request one token a step, a new block when it crosses a block boundary), each with a
    new request's prompt_len-token prompt beside them when prompt_len (finished the step after;
    two sets of blocks after the batch's, alternated). Token ids are drawn below vocab; every
    request samples as the report.SAMPLING preset `sampling` says."""
    rng = np.random.default_rng(0)

    def options(num_prompt_tokens: int) -> worker_pb2.SamplingOptions:
        return worker_pb2.SamplingOptions(
            **{"top_p": 1.0, **SAMPLING[sampling]}, prompt_len=num_prompt_tokens
        )

    blocks_per_request = -(-(context_len + steps + 1) // BLOCK_SIZE)
    plans = [worker_pb2.StepPlan(step_id=0)]
    tables = []
    for i in range(batch):
        start = first_block + i * blocks_per_request
        tables.append(list(range(start, start + blocks_per_request)))
        have = -(-context_len // BLOCK_SIZE)
        plans[0].new_requests.append(
            worker_pb2.NewRequest(
                request_id=str(i),
                token_ids=rng.integers(0, vocab, context_len).tolist(),
                sampling=options(context_len),
                block_ids=tables[i][:have],
                num_scheduled_tokens=context_len,
            )
        )
    for step in range(steps):
        computed = context_len + step  # tokens in the cache before this step
        plan = worker_pb2.StepPlan(step_id=step + 1)
        cached = plan.cached_requests
        for i in range(batch):
            new = [tables[i][computed // BLOCK_SIZE]] if computed % BLOCK_SIZE == 0 else []
            cached.request_ids.append(str(i))
            cached.num_computed_tokens.append(computed)
            cached.num_scheduled_tokens.append(1)
            cached.num_new_blocks.append(len(new))
            cached.new_block_ids.extend(new)
            cached.replace_block_table.append(False)
        if prompt_len:
            prompt_blocks = -(-prompt_len // BLOCK_SIZE)
            start = first_block + batch * blocks_per_request + step % 2 * prompt_blocks
            plan.new_requests.append(
                worker_pb2.NewRequest(
                    request_id=f"prompt-{step}",
                    token_ids=rng.integers(0, vocab, prompt_len).tolist(),
                    sampling=options(prompt_len),
                    block_ids=list(range(start, start + prompt_blocks)),
                    num_scheduled_tokens=prompt_len,
                )
            )
            if step:
                plan.finished_request_ids.append(f"prompt-{step - 1}")
        plans.append(plan)
    finished = [str(i) for i in range(batch)] + ([f"prompt-{steps - 1}"] if prompt_len else [])
    plans.append(worker_pb2.StepPlan(finished_request_ids=finished))
    return plans


def cache_sizes(batch: int, context_len: int, steps: int, prompt_len: int = 0) -> dict:
    """ModelRunner.init_cache's sizes for decode_plans' requests: the batch's blocks, two
    prompts' (alternated), room for the batch and a prompt, and requests as long as either."""
    per_request = -(-(context_len + steps + 1) // BLOCK_SIZE)
    return {
        "num_blocks": batch * per_request + 2 * -(-prompt_len // BLOCK_SIZE) + 1,
        "block_size": BLOCK_SIZE,
        "max_num_seqs": batch + bool(prompt_len),
        "max_model_len": max(per_request * BLOCK_SIZE, prompt_len),
        "max_num_batched_tokens": batch + prompt_len,
    }


def time_steps(
    runner: ModelRunner, plans: list, on_step: Callable[[], None] | None = None
) -> tuple[list[float], float, float]:
    """Runs the plans as WorkerService does with each next plan already there; the wall time
    of each decode step after the first fifth, ms (from one step's tokens arriving to the
    next's), and the shares of those steps that replayed a whole graph and the graphs in
    pieces. on_step is called as each step's time is taken (every one, the first fifth's too)."""
    runner.execute(plans[0])  # the prefill, alone (execute waits for its tokens)
    times, graphed, pieced, launched = [], [], [], None
    last = time.perf_counter()
    for plan in plans[1:-1]:
        step = runner.launch(plan)
        if launched is not None:
            result = runner.finish(launched)
            graphed.append(result.cuda_graph)
            pieced.append(result.piecewise_graph)
            now = time.perf_counter()
            times.append((now - last) * 1e3)
            last = now
            if on_step is not None:
                on_step()
        launched = step
    runner.finish(launched)
    runner.execute(plans[-1])
    warm = len(times) // 5  # the first fifth warms up
    timed = max(len(graphed) - warm, 1)
    return times[warm:], sum(graphed[warm:]) / timed, sum(pieced[warm:]) / timed


def time_graph(runner: ModelRunner, size: int, repeats: int = 50) -> float:
    """One replay of the decode graph of `size`, back to back, ms (median over 5 rounds)."""
    graph = runner.graphs.graphs[size]
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            graph.replay()
        end.record()
        end.synchronize()
        rounds.append(start.elapsed_time(end) / repeats)
    return statistics.median(rounds)


def profile_graph(runner: ModelRunner, size: int, top: int = 15) -> None:
    """Prints the kernels of one replay of the decode graph of `size` by device time (every
    rank of a group must call it: the graph holds collectives)."""
    from torch.profiler import ProfilerActivity, profile

    graph = runner.graphs.graphs[size]
    graph.replay()
    torch.cuda.synchronize()
    if distributed.tp_size() > 1:  # the ranks start together: no wait on a late peer timed
        torch.distributed.barrier()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            graph.replay()
        torch.cuda.synchronize()
    if distributed.tp_rank() != 0:
        return
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in events) / 10
    print(f"graph of {size}: {total / 1e3:.3f} ms of kernels per replay")
    for e in events[:top]:
        share = e.device_time_total / 10
        print(f"  {share / 1e3:7.3f} ms  {e.count // 10:4d}x  {e.key[:90]}")


def profile_steps(runner: ModelRunner, plans: list, top: int = 12) -> str:
    """Runs the plans as time_steps does under the torch profiler, recording up to 10 steps
    after the first fifth, and returns what one of those steps spent where: its wall time (the
    profiler's cost included), its kernels' time, and the kernels and host calls that took the
    most (self time; one line each: ProfilerStep*'s is the host's time outside torch's
    operators, Python and Triton's launches among it). Every rank of a group must call it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    num_steps = len(plans) - 3  # the prefill and the finish plan are not steps; nor the first
    warm = max(num_steps // 5, 1)
    active = min(10, num_steps - warm)
    record = schedule(wait=warm - 1, warmup=1, active=active, repeat=1)
    activities = [ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, schedule=record) as p:
        times, _, _ = time_steps(runner, plans, on_step=p.step)
    events = p.key_averages()
    # The device's own events: a host operator's "self device time" counts its kernels again,
    # and so does the step's annotation on the device's timeline (ProfilerStep#N).
    kernels = sorted(
        (
            e
            for e in events
            if e.device_type != DeviceType.CPU
            and e.self_device_time_total > 0
            and not e.key.startswith("ProfilerStep")
        ),
        key=lambda e: -e.self_device_time_total,
    )
    host = sorted(events, key=lambda e: -e.self_cpu_time_total)
    kernel_ms = sum(e.self_device_time_total for e in kernels) / active / 1e3
    lines = [
        f"a step under the profiler: {statistics.mean(times[:active]):.3f} ms wall, "
        f"{kernel_ms:.3f} ms of kernels ({active} steps)"
    ]
    for e in kernels[:top]:
        share = e.self_device_time_total / active / 1e3
        lines.append(f"  kernel {share:7.3f} ms {e.count / active:6.1f}x  {e.key[:80]}")
    for e in host[:top]:
        share = e.self_cpu_time_total / active / 1e3
        lines.append(f"  host   {share:7.3f} ms {e.count / active:6.1f}x  {e.key[:80]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama-3-8b", help="a dummy preset or a checkpoint")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1])
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="the kernels of one graph replay (decodes alone), else of the steps and their host",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument(
        "--prompt-len", type=int, default=0, help="a new prompt of this many tokens every step"
    )
    add_sampling_argument(parser)
    args = parser.parse_args(argv)
    world = args.tensor_parallel_size
    if world == 1:
        run_rank(0, args, "")
        return
    with tempfile.TemporaryDirectory(prefix="worker-step-") as where:
        torch.multiprocessing.spawn(
            run_rank, args=(args, os.path.join(where, "store")), nprocs=world, join=True
        )


def run_rank(rank: int, args: argparse.Namespace, store_path: str) -> None:
    """One rank's measurement (the whole benchmark when there is one); rank 0 reports."""
    world = args.tensor_parallel_size
    torch.cuda.set_device(rank)
    device, dtype = torch.device("cuda", rank), getattr(torch, args.dtype)
    distributed.init(rank, world, "", 0, store_path)
    bandwidth = measure_copy_bandwidth()
    path = resolve_model(args.model, "dummy")
    fmt = "dummy" if path == args.model else "auto"
    model = load_model(path, fmt, dtype, device, seed=0)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    runner = ModelRunner(model, device, dtype, seed=0)
    distributed.enable_small_all_reduce(dtype, device)
    sizes = cache_sizes(max(args.batch_size), args.context_len, args.steps, args.prompt_len)
    torch.cuda.empty_cache()  # what the allocator cached so far leaves the device's free memory
    free, began = torch.cuda.mem_get_info()[0], time.perf_counter()
    runner.init_cache(**sizes, enforce_eager=args.enforce_eager)
    init_s = time.perf_counter() - began
    kv_bytes = sizes["num_blocks"] * runner.bytes_per_block(sizes["block_size"])
    graph_bytes = free - torch.cuda.mem_get_info()[0] - kv_bytes
    roof = roofline_ms(weight_bytes, bandwidth)
    report = print if rank == 0 else (lambda *a, **k: None)
    report(
        f"cache and CUDA graphs ready in {init_s:.1f} s; the KV cache {kv_bytes / 1e9:.2f} GB, "
        f"the graphs and what the allocator keeps beside it {graph_bytes / 1e9:.2f} GB"
    )
    report(f"card: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    report(
        f"model: {args.model}, TP={world} ({distributed.all_reduce_kind() or 'no collectives'}), "
        f"{weight_bytes / 1e9:.2f} GB of weights a rank, roofline {roof:.3f} ms"
    )
    rows = []
    for batch in args.batch_size:
        plans = decode_plans(
            batch, args.context_len, args.steps, 0, args.prompt_len, sampling=args.sampling
        )
        steps, hits, pieces = time_steps(runner, plans)
        step_ms = statistics.median(steps)
        graph_ms = None
        if runner.graphs is not None and not args.prompt_len and args.sampling == "greedy":
            graph_ms = time_graph(runner, runner.graphs.size_for(batch))
        rows.append((batch, graph_ms, step_ms, hits, pieces))
        if args.profile and graph_ms is not None:
            profile_graph(runner, runner.graphs.size_for(batch))
        elif args.profile:
            report(profile_steps(runner, plans))
        graph = "-" if graph_ms is None else f"{graph_ms:.3f}"
        report(f"batch {batch}: graph {graph} ms, worker step {step_ms:.3f} ms", flush=True)
    report()
    report(
        "| model | TP | batch | prompt tokens a step | sampling | graph replay (ms) "
        "| worker step (ms) | steps replayed | steps in pieces | roofline (ms) |"
    )
    report("|---|---|---|---|---|---|---|---|---|---|")
    for batch, graph_ms, step_ms, hits, pieces in rows:
        graph = "-" if graph_ms is None else f"{graph_ms:.3f}"
        report(
            f"| {args.model} | {world} | {batch} | {args.prompt_len} | {args.sampling} | {graph} "
            f"| {step_ms:.3f} | {hits:.0%} | {pieces:.0%} | {roof:.3f} |"
        )
    if world > 1:
        # Tearing down NCCL and the symmetric memory at exit can hang (seen on 2 x H200): the
        # ranks leave together, at once.
        torch.distributed.barrier()
        os._exit(0)


if __name__ == "__main__":
    main()
