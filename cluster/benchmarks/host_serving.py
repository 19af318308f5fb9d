"""The serving host's side at a device's pace, without a model or a GPU: the throughput
benchmark's clients (report.run_workload), --frontends real frontend processes sharing one
port, the real engine core (in this process, as in the scheduler actor's) and --replicas
replicas whose rank is a modelless process playing a device (modelless_rank.SequenceRank:
--device-ms a step, plus --prefill-us for each prompt token). What the host's processes deliver
when the device is as fast as a given card, and whether R replicas give R times one.

    python -m cluster.benchmarks.host_serving [--replicas 1 2] [--frontends 4] [--clients 8]
        [--connections 4] [--num-requests 1024] [--input-len 128] [--output-len 128]
        [--max-num-seqs 512] [--device-ms 3.7] [--prefill-us 1.0] [--profile]

                clients (processes) --gRPC, one port--> frontends (processes)
                                                          | one stream each
                                                          v
    ranks (a process each) <--Execute stream-- engine core (this process: R step loops)

For each replica count: a warm-up pass of other prompts, then the workload with each completion
in one message, then streamed (every step's tokens): output tokens/s, the engines' steps (median
decode step and the ranks' median idle before one: what a device would wait on the host), when
the steps ran within the pass, each process's CPU share, each frontend's share of the tokens
and the engine core's CPU by thread (--profile: the step loops' cProfile). Last, streamed / one
message for each replica count and each count against the first.

The defaults play the Llama-3.2-1B shape on one H200 (BENCHMARKS.md: decode steps of 512
sequences take 3.7 ms); `--device-ms 0` answers at once (the host's own ceiling).
"""

import argparse
import cProfile
import io
import multiprocessing
import os
import pstats
import sys
import tempfile
import threading

from cluster.benchmarks.frontend_stream import TIMEOUT_S, start_frontends
from cluster.benchmarks.modelless_rank import SEQUENCE_VOCAB_SIZE, SequenceRank, serve_rank
from cluster.benchmarks.report import (
    ProcessCpu,
    fmt,
    format_process_cpu,
    format_timeline,
    make_prompts,
    records_between,
    run_workload,
    step_anatomy,
)
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig
from scheduler.core.engine import Engine
from scheduler.core.engine_core import EngineCore
from scheduler.core.replica import EngineConfigs, ReplicaSpec

BLOCK_SIZE = 16


# (thread name prefix, role) in the engine core's process; a thread Python does not know is
# gRPC's own (its C core's pollers and executors).
_ROLES = (
    ("engine-watchdog", "engines' watchdogs"),
    ("engine", "engines' step loops"),
    ("core_", "frontend links' senders"),  # the core's gRPC server pool runs Connect
    ("frontend-link", "frontend links' readers"),
    ("Thread-", "gRPC's Python threads"),  # the core's server poller, the worker streams'
    ("MainThread", "the benchmark's main thread"),
    ("", "gRPC's C threads"),
)


def _thread_cpu_s() -> dict[int, tuple[str, float]]:
    """This process's threads: native id -> (role, CPU seconds so far, /proc), the role by the
    Python thread's name (_ROLES)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:  # nanoseconds on a CPU (/proc's stat counts clock ticks, 10 ms)
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                cpu_s = int(f.read().split()[0]) / 1e9
        except OSError:  # ended meanwhile
            continue
        name = names.get(int(tid), "")
        role = next((r for prefix, r in _ROLES if name.startswith(prefix)), name)
        out[int(tid)] = (role, cpu_s)
    return out


def _thread_shares(before: dict[int, tuple[str, float]], wall: float) -> str:
    """The engine core's CPU over a pass by thread role, as shares of one core."""
    by_role: dict[str, float] = {}
    for tid, (role, cpu) in _thread_cpu_s().items():
        by_role[role] = by_role.get(role, 0.0) + cpu - before.get(tid, (role, 0.0))[1]
    parts = sorted(by_role.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{role} {cpu / wall:.0%}" for role, cpu in parts if cpu > 0)


FIRST_PROMPT_TOKEN = 100  # prompts draw from [100, SEQUENCE_VOCAB_SIZE): no special tokens


def run(args: argparse.Namespace, replicas: int) -> dict:
    """The warm-up, one-message and streamed passes against `replicas` replicas: for "one
    message" and "streamed", run_workload's figures with the pass's step anatomy ("anatomy"),
    timeline line ("timeline") and CPU shares ("cpu")."""
    from cluster.models import resolve_tokenizer

    tokenizer_path = resolve_tokenizer(args.tokenizer, args.tokenizer, "auto")
    max_model_len = args.input_len + args.output_len + 1
    blocks_per_request = -(-max_model_len // BLOCK_SIZE)
    seqs = args.max_num_seqs
    configs = EngineConfigs(
        ModelConfig(max_model_len=max_model_len),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=seqs * blocks_per_request),
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )
    sys.setswitchinterval(0.0005)  # as the scheduler actor's process, where the core runs
    profilers: list[cProfile.Profile] = []
    if args.profile:
        _profile_step_loops(profilers)
    ctx = multiprocessing.get_context("spawn")
    ranks, frontends = [], []
    core = None
    out: dict = {}
    try:
        specs = []
        for k in range(replicas):
            port, stop = ctx.Queue(), ctx.Event()
            rank = SequenceRank(max_model_len, args.device_ms, args.prefill_us)
            proc = ctx.Process(target=serve_rank, args=(rank, port, stop), daemon=True)
            proc.start()
            ranks.append((proc, stop))
            specs.append(ReplicaSpec((f"127.0.0.1:{port.get(timeout=TIMEOUT_S)}",), f"r{k}"))
        core = EngineCore("bench")
        core.start(specs, configs)
        with tempfile.TemporaryDirectory(prefix="pagedserve-metrics-") as metrics_dir:
            frontends = start_frontends(
                ctx, args.frontends, core.address, tokenizer_path, metrics_dir
            )
            address = f"127.0.0.1:{frontends[0].ports[0]}"
            vocab = SEQUENCE_VOCAB_SIZE
            warm_up = make_prompts(args.num_requests, args.input_len, vocab, seed=1)
            clients = (args.clients, args.connections)
            run_workload(address, warm_up, args.output_len, True, *clients)
            pids = {
                "engine core": [os.getpid()],
                "frontends": [f.process.pid for f in frontends],
            }
            for seed, (label, stream) in enumerate(
                (("one message", False), ("streamed", True)), start=2
            ):
                prompts = make_prompts(args.num_requests, args.input_len, vocab, seed=seed)
                cpu, tokens = ProcessCpu(pids), [f.tokens() for f in frontends]
                threads = _thread_cpu_s()
                timed = run_workload(address, prompts, args.output_len, stream, *clients)
                shares = cpu.shares()
                timed["core threads"] = _thread_shares(threads, timed["wall_s"])
                tokens = [f.tokens() - n for f, n in zip(frontends, tokens, strict=True)]
                timed["frontends"] = "; ".join(
                    f"{n / timed['output_tokens']:.0%} of the tokens at {share:.0%} CPU"
                    for n, share in zip(tokens, shares["frontends"], strict=True)
                )
                shares["clients"] = timed["client_cpu"]
                steps = records_between(core.fleet.step_records(), timed["start"], timed["end"])
                timed["anatomy"] = step_anatomy(steps)
                timed["timeline"] = format_timeline(steps, timed["start"], timed["end"])
                timed["cpu"] = format_process_cpu(shares, "processes'")
                out[label] = timed
    finally:
        for frontend in frontends:
            frontend.stop()
        if core is not None:
            core.stop()
        for proc, stop in ranks:
            stop.set()
            proc.join(timeout=10)
        Engine._loop = _STEP_LOOP
    if profilers:
        text = io.StringIO()
        pstats.Stats(*profilers, stream=text).sort_stats("tottime").print_stats(30)
        out["profile"] = text.getvalue()
    return out


_STEP_LOOP = Engine._loop


def _profile_step_loops(profilers: list[cProfile.Profile]) -> None:
    """Every engine's step loop started from now on runs under a profiler of its own (put on
    profilers; disabled when the loop ends)."""

    def profiled(engine: Engine) -> None:
        profiler = cProfile.Profile()
        profilers.append(profiler)
        profiler.enable()
        try:
            _STEP_LOOP(engine)
        finally:
            profiler.disable()

    Engine._loop = profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--frontends", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="of each client process")
    parser.add_argument("--num-requests", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512, help="of each replica")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--device-ms", type=float, default=3.7, help="a step's device time")
    parser.add_argument(
        "--prefill-us", type=float, default=1.0, help="device time a prompt token adds to a step"
    )
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the engines' step loops (all passes), top 30 by own time",
    )
    args = parser.parse_args()
    counts = ("frontends", "clients", "connections", "num_requests", "input_len", "output_len")
    for name in (*counts, "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.replicas) < 1:
        parser.error("--replicas must be at least 1")
    if min(args.device_ms, args.prefill_us) < 0:
        parser.error("--device-ms and --prefill-us must be at least 0")
    results = {}
    for r in args.replicas:
        results[r] = run(args, r)
        profile = results[r].pop("profile", None)
        if profile is not None:
            print(f"\n{r} replica(s): the step loops' profile\n{profile}")
        for label, p in results[r].items():
            a = p["anatomy"]
            print(f"\n{r} replica(s), {label}: {p['tok_per_s']:.0f} output tok/s")
            if a is not None:
                print(
                    f"  steps {a.num_steps} ({a.num_decode_steps} decode-only), median decode "
                    f"step {fmt(a.median_decode_step_ms, '.2f')} ms, median rank idle "
                    f"{a.median_idle_ms:.2f} ms, engine turnaround {a.median_turnaround_ms:.2f} ms"
                )
            print(f"  {p['timeline']}")
            print(f"  {p['cpu']}")
            print(f"  frontends: {p['frontends']}")
            print(f"  engine core's threads: {p['core threads']}")
    print(
        "\n| replicas | output | output tok/s | wall (s) | median TTFT (ms) | median decode "
        "step (ms) | median rank idle (ms) | against one message | "
        f"against {args.replicas[0]} replica(s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    first = results[args.replicas[0]]
    for r, passes in results.items():
        for label, p in passes.items():
            a = p["anatomy"]
            print(
                f"| {r} | {label} | {p['tok_per_s']:.0f} | {p['wall_s']:.2f} | "
                f"{p['ttft_ms']:.1f} | {fmt(a and a.median_decode_step_ms, '.2f')} | "
                f"{fmt(a and a.median_idle_ms, '.2f')} | "
                f"{p['tok_per_s'] / passes['one message']['tok_per_s']:.2f}x | "
                f"{p['tok_per_s'] / first[label]['tok_per_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()
