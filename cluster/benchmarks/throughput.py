"""Offline serving throughput of a cluster started from a config, as `vllm bench throughput`.

A fixed workload through a real cluster, and (--hf-batch) HF transformers' batched `generate`
on the same prompts and card as the baseline.

    pagedserve bench throughput -c configs/local.yaml --num-requests 256 --input-len 128 \
        --output-len 128 [--hf-batch 64] [--stream] [--set model.dtype=bfloat16]

(`python -m cluster.benchmarks.throughput` takes the same arguments.) Every request generates
exactly --output-len tokens (ignore_eos), greedy unless --sampling says otherwise
(report.SAMPLING). Each completion comes back in one message
(output_kind FINAL_ONLY, as vLLM's offline LLM and its throughput benchmark); --stream has every
step's tokens streamed instead (DELTA, as a chat client). --clients processes send the requests
(default two per frontend; see report.run_workload). The workload runs twice and the second
pass is timed (the first compiles kernels). Prints the card, the roofline of a decode step next
to the timed pass's median decode step, the anatomy of the timed pass's steps, how busy the
engine core's and the frontends' processes were (a share of one core each), and last a
markdown table: output tokens, wall time, output tokens per second, median time to first token
(to the first message when streamed; otherwise the server's own figure, from the last message),
median decode step and the roofline's share of it.
"""

import argparse
import statistics
import sys
import time

from cluster.benchmarks.report import (
    ProcessCpu,
    add_cluster_arguments,
    add_sampling_argument,
    bench_cluster,
    fmt,
    format_anatomy,
    format_compiled,
    format_frontends,
    format_process_cpu,
    format_roofline,
    format_timeline,
    make_prompts,
    records_between,
    roofline_pct,
    run_workload,
    step_anatomy,
    triton_cache_entries,
)

__all__ = ["add_arguments", "main", "make_prompts", "run", "run_hf", "run_workload"]


def run_hf(model_path: str, prompts: list[list[int]], output_len: int, batch: int) -> dict:
    """HF transformers' generate, batched, on the same prompts (all of one length: no padding)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model_path.endswith(".gguf"):
        directory, name = os.path.split(model_path)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    kwargs = {"max_new_tokens": output_len, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        warm = torch.tensor(prompts[:1], device=device)
        model.generate(
            warm, attention_mask=torch.ones_like(warm), **{**kwargs, "max_new_tokens": 2}
        )
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            tokens += out.shape[0] * (out.shape[1] - ids.shape[1])
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "ttft_ms": float("nan"),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=0, help="also run HF generate (0 = skip)")
    add_sampling_argument(parser)
    parser.add_argument(
        "--stream", action="store_true", help="stream every step's tokens (output_kind DELTA)"
    )
    parser.add_argument(
        "--clients",
        type=int,
        default=None,
        help="client processes (default: 2 per frontend)",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=4,
        help="connections of each client process, its prompts sent round-robin over them "
        "(with --no-spread each lands on one frontend: several spread the load more evenly)",
    )
    parser.add_argument(
        "--no-spread",
        dest="spread",
        action="store_false",
        help="each connection's calls to the frontend the kernel handed it (by default each "
        "client sends to the frontends' own ports in turn: AsyncClient.spread)",
    )


def run(args: argparse.Namespace) -> int:
    if min(args.num_requests, args.input_len, args.output_len, args.connections) < 1:
        raise ValueError("--num-requests, --input-len, --output-len and --connections must be >= 1")
    rows = []
    with bench_cluster(args.config, args.set) as bench:
        clients = args.clients or 2 * bench.config.server.frontends
        prompts = make_prompts(args.num_requests, args.input_len, bench.vocab_size)
        # A first pass of other random prompts (no prefix the timed pass could reuse) compiles
        # the Triton kernels for the batch shapes the workload meets; the second is timed.
        warm_up = make_prompts(args.num_requests, args.input_len, bench.vocab_size, seed=1)
        run_workload(
            bench.address,
            warm_up,
            args.output_len,
            args.stream,
            clients,
            args.connections,
            args.spread,
            args.sampling,
        )
        since, steps_before = time.monotonic(), bench.num_steps()  # monotonic: system-wide
        compiled_before = triton_cache_entries()
        cpu, streamed = ProcessCpu(bench.server_pids()), bench.frontends_streamed()
        timed = run_workload(
            bench.address,
            prompts,
            args.output_len,
            args.stream,
            clients,
            args.connections,
            args.spread,
            args.sampling,
        )
        cpu_shares = cpu.shares()
        frontends = format_frontends(
            streamed, bench.frontends_streamed(), cpu_shares["frontends"], timed["start"]
        )
        steps = records_between(bench.step_records(), since, time.monotonic())
        num_steps = bench.num_steps() - steps_before
        compiled_after = triton_cache_entries()
    anatomy = step_anatomy(steps)
    decode_ms = None if anatomy is None else anatomy.median_decode_step_ms
    rows.append(("pagedserve (streamed)" if args.stream else "pagedserve", timed, decode_ms))
    if args.hf_batch:
        hf = run_hf(bench.cluster.model_path, prompts, args.output_len, args.hf_batch)
        rows.append((f"HF generate (batch {args.hf_batch})", hf, None))
    print(
        f"\nmodel {bench.config.model.model}, {args.num_requests} requests x "
        f"{args.input_len} prompt + {args.output_len} output tokens"
    )
    print("\n".join(format_roofline(bench.roofline, decode_ms)))
    if steps:
        kept = "" if len(steps) == num_steps else f" (the last {len(steps)} kept as records)"
        print(
            f"timed pass: {num_steps} engine steps over all replicas, mean "
            f"{statistics.mean(len(r['scheduled']) for r in steps):.0f} sequences per step"
            f"{kept}"
        )
    print("\n".join(format_anatomy(anatomy, "the timed pass's steps, all replicas")))
    print(format_timeline(steps, timed["start"], timed["end"]))
    print(format_compiled(compiled_before, compiled_after))
    print(format_process_cpu(cpu_shares))
    print(frontends)
    print(format_process_cpu({"clients": timed["client_cpu"]}, "client processes'"))
    print(
        "\n| engine | output tokens | wall (s) | output tok/s | median TTFT (ms) | "
        "median decode step (ms) | roofline / measured |"
    )
    print("|---|---|---|---|---|---|---|")
    none = "none" if bench.roofline.ms is None else "-"  # none applies, or nothing to compare
    for name, r, step_ms in rows:
        pct = roofline_pct(bench.roofline, step_ms)
        share = none if pct is None else f"{pct:.1f}%"
        print(
            f"| {name} | {r['output_tokens']} | {r['wall_s']:.2f} | {r['tok_per_s']:.0f} | "
            f"{r['ttft_ms']:.1f} | {fmt(step_ms, '.3f')} | {share} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
