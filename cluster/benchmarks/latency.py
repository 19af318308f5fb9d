"""Decode latency of a cluster started from a config, as vLLM's `vllm bench latency`.

    pagedserve bench latency -c configs/local.yaml --batch-size 1 8 32 --input-len 128 \
        --output-len 512 [--num-iters 3] [--num-iters-warmup 1] [--set model.dtype=bfloat16]

For each batch size in turn (on the same cluster), each iteration sends batch-size requests of
random token prompts at once (greedy unless --sampling says otherwise, ignore_eos, exactly
--output-len tokens, one message per completion: output_kind FINAL_ONLY) and waits for all; the
warm-up iterations are not timed.
Reported per batch size: ms per output token (the mean decode step of the timed iterations:
the steps in which every scheduled request computes one token; their median is in the anatomy,
and misreads when a launch waits for the device), the median end-to-end latency of
an iteration, the roofline of a decode step next to it and the anatomy of the timed steps; then
a markdown table.
"""

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

from cluster.benchmarks.report import (
    Anatomy,
    BenchCluster,
    add_cluster_arguments,
    add_sampling_argument,
    bench_cluster,
    fmt,
    format_anatomy,
    format_roofline,
    make_prompts,
    records_between,
    roofline_pct,
    run_workload,
    step_anatomy,
)


@dataclass
class BatchResult:
    batch_size: int
    latencies_s: list[float]  # end to end, one per timed iteration
    anatomy: Anatomy | None  # of the timed iterations' steps

    @property
    def ms_per_token(self) -> float | None:
        return None if self.anatomy is None else self.anatomy.mean_decode_step_ms


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument(
        "--batch-size", type=int, nargs="+", default=[1], help="one or more, measured in turn"
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--num-iters", type=int, default=3, help="timed iterations")
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    add_sampling_argument(parser)


def measure(
    bench: BenchCluster, batch_size: int, args: argparse.Namespace, seed: int
) -> BatchResult:
    """Warm-up iterations, then timed ones; each of other random prompts (nothing to reuse from
    the prefix cache). The step records are read after each iteration (they are a bounded
    window of the latest steps)."""
    latencies: list[float] = []
    steps: list[dict] = []
    for i in range(args.num_iters_warmup + args.num_iters):
        prompts = make_prompts(batch_size, args.input_len, bench.vocab_size, seed=seed + i)
        start = time.monotonic()
        result = run_workload(bench.address, prompts, args.output_len, sampling=args.sampling)
        end = time.monotonic()
        if i >= args.num_iters_warmup:
            latencies.append(result["wall_s"])
            steps += records_between(bench.step_records(), start, end)
    return BatchResult(batch_size, latencies, step_anatomy(steps))


def report(bench: BenchCluster, r: BatchResult, args: argparse.Namespace) -> list[str]:
    each = ", ".join(f"{s * 1e3:.1f}" for s in r.latencies_s)
    return [
        "",
        f"batch size {r.batch_size}: {args.num_iters} timed iteration(s) of {r.batch_size} x "
        f"{args.input_len} prompt + {args.output_len} output tokens",
        f"  ms per output token (mean decode step): {fmt(r.ms_per_token, '.3f')}",
        f"  end-to-end latency: median {statistics.median(r.latencies_s) * 1e3:.1f} ms "
        f"(iterations: {each})",
        *("  " + line for line in format_roofline(bench.roofline, r.ms_per_token)[2:]),
        *("  " + line for line in format_anatomy(r.anatomy)),
    ]


def table(bench: BenchCluster, results: list[BatchResult]) -> list[str]:
    lines = [
        "| batch size | ms / output token | roofline (ms / step) | roofline / measured | "
        "median latency (ms) | steps | median step (ms) | worker Execute (ms) | "
        "worker idle (ms) | graph hits (decode / all) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    none = "none" if bench.roofline.ms is None else "-"  # none applies, or nothing to compare
    for r in results:
        a = r.anatomy
        pct = roofline_pct(bench.roofline, r.ms_per_token)
        share = none if pct is None else f"{pct:.1f}%"
        hits = "-"
        if a is not None:
            decode = "-" if a.graph_hit_decode is None else f"{100 * a.graph_hit_decode:.0f}%"
            hits = f"{decode} / {100 * a.graph_hit_all:.0f}%"
        lines.append(
            f"| {r.batch_size} | {fmt(r.ms_per_token, '.3f')} | "
            f"{fmt(bench.roofline.ms, '.3f', none)} | {share} | "
            f"{statistics.median(r.latencies_s) * 1e3:.1f} | {a.num_steps if a else 0} | "
            f"{fmt(a and a.median_step_ms)} | {fmt(a and a.median_worker_ms)} | "
            f"{fmt(a and a.median_idle_ms)} | {hits} |"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    if args.num_iters < 1 or args.num_iters_warmup < 0:
        raise ValueError("--num-iters must be >= 1 and --num-iters-warmup >= 0")
    if min(args.batch_size) < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--batch-size, --input-len and --output-len must be >= 1")
    with bench_cluster(args.config, args.set) as bench:
        header = [f"\nmodel {bench.config.model.model}", *format_roofline(bench.roofline)]
        print("\n".join(header), flush=True)
        results = []
        for n, batch_size in enumerate(args.batch_size):
            seed = 1000 * n
            results.append(measure(bench, batch_size, args, seed))
            print("\n".join(report(bench, results[-1], args)), flush=True)
    print("\n" + "\n".join(table(bench, results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
