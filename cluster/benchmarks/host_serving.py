"""The serving host's side at a device's pace, without a model or a GPU: the throughput
benchmark's clients (report.run_workload), --frontends real frontend processes sharing one
port, the real engine core (in a process of its own, as the scheduler actor's) and --replicas
replicas whose rank is a modelless process playing a device (modelless_rank.SequenceRank:
--device-ms a step, plus --prefill-us for each prompt token). What the host's processes deliver
when the device is as fast as a given card, and whether R replicas give R times one.

    python -m cluster.benchmarks.host_serving [--replicas 1 2] [--cores 1] [--frontends 4]
        [--clients 8] [--connections 4] [--num-requests 1024] [--input-len 128]
        [--output-len 128] [--max-num-seqs 512] [--device-ms 3.7] [--prefill-us 2.6] [--profile]

                clients (processes) --gRPC, one port--> frontends (processes)
                                                          | one stream each
                                                          v
    ranks (a process each) <--Execute stream-- engine core (a process: R step loops)

--request-rate R [R ...] replaces the two passes with `bench serve`'s clients (every token
streamed over gRPC, a Poisson schedule at each rate in turn): TTFT, inter-token and end-to-end
latency percentiles beside the engines' steps in that pass, and end-to-end against its floor
(--output-len steps of the median step): what the host adds to a request's time under arrivals
spread over time rather than all at once.

--cores C runs C engine-core processes instead, each over R / C of the replicas, every frontend
connected to every core and routing each new request to the core holding the fewest of its
unfinished ones (scheduler.frontend.core_set): the replicas' step loops and their frontends'
traffic in processes of their own, as data parallelism with an engine process per replica has
them.

For each replica count: a warm-up pass of other prompts, then the workload with each completion
in one message, then streamed (every step's tokens): output tokens/s, the engines' steps (median
decode step and the ranks' median idle before one: what a device would wait on the host), when
the steps ran within the pass, each process's CPU share, each frontend's share of the tokens
and the engine core's CPU by thread (--profile: the step loops' cProfile). Last, streamed / one
message for each replica count and each count against the first.

The defaults play the Llama-3.2-1B shape on one H200 (BENCHMARKS.md: decode steps of 512
sequences take 3.7 ms, prefill steps of 16384 prompt tokens 42.7 ms: 2.6 us a token);
`--device-ms 0` answers at once (the host's own ceiling).
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
from collections import deque

from cluster.benchmarks.frontend_stream import TIMEOUT_S, start_frontends
from cluster.benchmarks.modelless_rank import SEQUENCE_VOCAB_SIZE, SequenceRank, serve_rank
from cluster.benchmarks.report import (
    ProcessCpu,
    fmt,
    format_frontends,
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
PASS_STEP_RECORDS = 1 << 16  # step records an engine keeps here (a pass's steps, all of them)


# (thread name prefix, role) in the engine core's process; a thread Python does not know is
# gRPC's own (its C core's pollers and executors).
_ROLES = (
    ("engine-watchdog", "engines' watchdogs"),
    ("engine", "engines' step loops"),
    ("core_", "frontend links' senders"),  # the core's gRPC server pool runs Connect
    ("frontend-link", "frontend links' readers"),
    ("Thread-", "gRPC's Python threads"),  # the core's server poller, the worker streams'
    ("MainThread", "its main thread (the benchmark's commands)"),
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


def _thread_shares(cpu: dict[str, float], wall: float) -> str:
    """CPU seconds by thread role as shares of one core over wall seconds, largest first."""
    parts = sorted(cpu.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{role} {s / wall:.0%}" for role, s in parts if s > 0)


def _core_process(specs: list[ReplicaSpec], configs: EngineConfigs, profile: bool, conn) -> None:
    """An engine core over specs' replicas, as the scheduler actor's process runs one. conn:
    its address out (or why it failed), then "records" (send the step records), "threads"
    (send _thread_cpu_s()), "stop" (send the step loops' profile, or None, and stop)."""
    sys.setswitchinterval(0.0005)  # as the scheduler actor's process
    profilers: list[cProfile.Profile] = []
    if profile:
        _profile_step_loops(profilers)
    try:
        core = EngineCore("bench")
        core.start(specs, configs)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    for replica in core.fleet.replicas:  # a Poisson pass runs far more steps than MAX_STEP_RECORDS
        engine = replica.engine
        engine.step_records = deque(engine.step_records, maxlen=PASS_STEP_RECORDS)
    conn.send(core.address)
    while (command := conn.recv()) != "stop":
        conn.send(core.fleet.step_records() if command == "records" else _thread_cpu_s())
    core.stop()
    text = None
    if profilers:
        out = io.StringIO()
        pstats.Stats(*profilers, stream=out).sort_stats("tottime").print_stats(30)
        text = out.getvalue()
    conn.send(text)


class _Core:
    """An engine-core process (_core_process) and its pipe."""

    def __init__(self, ctx, specs: list[ReplicaSpec], configs: EngineConfigs, profile: bool):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_core_process, args=(specs, configs, profile, child))
        self.process.start()
        self.address = self._answer()
        if not self.address.startswith("127.0.0.1:"):
            raise RuntimeError(f"an engine core failed: {self.address}")

    def _answer(self):
        if not self.conn.poll(TIMEOUT_S):
            raise TimeoutError(f"an engine core did not answer within {TIMEOUT_S} s")
        return self.conn.recv()

    def ask(self, command: str):
        self.conn.send(command)
        return self._answer()

    def stop(self) -> str | None:
        """Stops it; the step loops' profile, if it ran them under one."""
        profile = None
        if self.process.is_alive():
            try:
                profile = self.ask("stop")
            except (OSError, EOFError, TimeoutError):  # it is gone already
                pass
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
        return profile


def _by_role(threads: dict[int, tuple[str, float]], before: dict) -> dict[str, float]:
    """CPU seconds by role since `before` (both _thread_cpu_s() of one process)."""
    by_role: dict[str, float] = {}
    for tid, (role, cpu) in threads.items():
        by_role[role] = by_role.get(role, 0.0) + cpu - before.get(tid, (role, 0.0))[1]
    return by_role


def run(args: argparse.Namespace, replicas: int, cores: int = 1) -> dict:
    """The warm-up, one-message and streamed passes against `replicas` replicas, driven by
    `cores` engine-core processes (replicas split evenly; every frontend routes over all of
    them): for "one message" and "streamed", run_workload's figures with the pass's step
    anatomy ("anatomy"), timeline line ("timeline"), CPU shares ("cpu"), each frontend's
    share of the tokens ("frontends") and each core's threads ("core threads"); "profile":
    the step loops' profile with args.profile."""
    from cluster.models import resolve_tokenizer

    if replicas % cores:
        raise ValueError(f"{replicas} replicas cannot be split evenly over {cores} engine cores")
    tokenizer_path = resolve_tokenizer(args.tokenizer, args.tokenizer, "auto")
    max_model_len = args.input_len + args.output_len + 1
    blocks_per_request = -(-max_model_len // BLOCK_SIZE)
    seqs = args.max_num_seqs
    configs = EngineConfigs(
        ModelConfig(max_model_len=max_model_len),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=seqs * blocks_per_request),
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=args.max_num_batched_tokens),
    )
    ctx = multiprocessing.get_context("spawn")
    ranks, frontends, engine_cores = [], [], []
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
        per_core = replicas // cores
        for c in range(cores):
            part = specs[c * per_core : (c + 1) * per_core]
            engine_cores.append(_Core(ctx, part, configs, args.profile))
        with tempfile.TemporaryDirectory(prefix="pagedserve-metrics-") as metrics_dir:
            frontends = start_frontends(
                ctx,
                args.frontends,
                [core.address for core in engine_cores],
                tokenizer_path,
                metrics_dir,
            )
            address = f"127.0.0.1:{frontends[0].ports[0]}"
            vocab = SEQUENCE_VOCAB_SIZE
            warm_up = make_prompts(args.num_requests, args.input_len, vocab, seed=1)
            clients = (args.clients, args.connections, args.spread)
            run_workload(address, warm_up, args.output_len, True, *clients)
            if args.request_rate:
                out["rates"] = [
                    _rate_pass(args, address, rate, seed, engine_cores)
                    for seed, rate in enumerate(args.request_rate, start=2)
                ]
            pids = {
                "engine cores": [core.process.pid for core in engine_cores],
                "frontends": [f.process.pid for f in frontends],
            }
            passes = () if args.request_rate else (("one message", False), ("streamed", True))
            for seed, (label, stream) in enumerate(passes, start=2):
                prompts = make_prompts(args.num_requests, args.input_len, vocab, seed=seed)
                cpu, streamed = ProcessCpu(pids), [f.streamed() for f in frontends]
                threads = [core.ask("threads") for core in engine_cores]
                timed = run_workload(address, prompts, args.output_len, stream, *clients)
                shares = cpu.shares()
                timed["core threads"] = [
                    _thread_shares(_by_role(core.ask("threads"), before), timed["wall_s"])
                    for core, before in zip(engine_cores, threads, strict=True)
                ]
                timed["frontends"] = format_frontends(
                    streamed,
                    [f.streamed() for f in frontends],
                    shares["frontends"],
                    timed["start"],
                )
                shares["clients"] = timed["client_cpu"]
                records = [r for core in engine_cores for r in core.ask("records")]
                steps = records_between(records, timed["start"], timed["end"])
                timed["anatomy"] = step_anatomy(steps)
                timed["timeline"] = format_timeline(steps, timed["start"], timed["end"])
                timed["cpu"] = format_process_cpu(shares, "processes'")
                out[label] = timed
    finally:
        for frontend in frontends:
            frontend.stop()
        profiles = [core.stop() for core in engine_cores]
        for proc, stop in ranks:
            stop.set()
            proc.join(timeout=10)
    if args.profile:
        out["profile"] = "\n".join(p for p in profiles if p)
    return out


def _rate_pass(
    args: argparse.Namespace, address: str, rate: float, seed: int, engine_cores: list[_Core]
) -> dict:
    """One Poisson pass of bench serve's clients at `rate` (every token streamed): serve's
    summary, plus the pass's step anatomy ("anatomy") and mean sequences a step ("seqs")."""
    from cluster.benchmarks import serve

    clients = argparse.Namespace(
        backend="grpc",
        address=address,
        token=None,
        spread=args.spread,
        clients=args.clients,
        max_concurrency=None,
        output_len=args.output_len,
    )
    prompts = make_prompts(args.num_requests, args.input_len, SEQUENCE_VOCAB_SIZE, seed=seed)
    parts = serve.send_in_processes(clients, prompts, rate, seed)
    start, end = min(p.start for p in parts), max(p.end for p in parts)
    records = [r for part in parts for r in part.records]
    out = serve.summarize(records, end - start, rate, None, args.input_len)
    steps = records_between([r for core in engine_cores for r in core.ask("records")], start, end)
    out["anatomy"] = step_anatomy(steps)
    out["seqs"] = sum(len(r["scheduled"]) for r in steps) / len(steps) if steps else 0.0
    return out


def _print_rates(r: int, cores: int, runs: list[dict], output_len: int) -> None:
    print(f"\n{r} replica(s) over {cores} engine core(s), Poisson arrivals, every token streamed")
    print(
        "| rate (req/s) | completed | output tok/s | TTFT p50 / p90 (ms) | ITL p50 / p90 / p99 "
        "(ms) | E2E p50 / p90 (ms) | steps, sequences a step | median step / rank idle / "
        "turnaround (ms) | E2E p50 against its floor |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        t, i, e, a = run["ttft_ms"], run["itl_ms"], run["e2e_ms"], run["anatomy"]
        floor = output_len * a.median_step_ms if a else float("nan")
        print(
            f"| {run['request_rate']} | {run['completed']} of {run['num_requests']} "
            f"| {run['output_throughput']:.0f} | {fmt(t['p50'], '.1f')} / {fmt(t['p90'], '.1f')} "
            f"| {fmt(i['p50'], '.2f')} / {fmt(i['p90'], '.2f')} / {fmt(i['p99'], '.2f')} "
            f"| {fmt(e['p50'], '.0f')} / {fmt(e['p90'], '.0f')} "
            f"| {a.num_steps if a else 0}, {run['seqs']:.1f} "
            f"| {fmt(a and a.median_step_ms, '.2f')} / {fmt(a and a.median_idle_ms, '.2f')} / "
            f"{fmt(a and a.median_turnaround_ms, '.2f')} "
            f"| {fmt(e['p50'] and e['p50'] / floor, '.2f')}x |"
        )


def _profile_step_loops(profilers: list[cProfile.Profile]) -> None:
    """Every engine's step loop started from now on in this process runs under a profiler of
    its own (put on profilers; disabled when the loop ends)."""
    step_loop = Engine._loop

    def profiled(engine: Engine) -> None:
        profiler = cProfile.Profile()
        profilers.append(profiler)
        profiler.enable()
        try:
            step_loop(engine)
        finally:
            profiler.disable()

    Engine._loop = profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--cores",
        type=int,
        default=1,
        help="engine-core processes, the replicas split evenly over them (a replica count "
        "they do not divide runs on one)",
    )
    parser.add_argument("--frontends", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8, help="client processes")
    parser.add_argument("--connections", type=int, default=4, help="of each client process")
    parser.add_argument(
        "--no-spread",
        dest="spread",
        action="store_false",
        help="each connection's calls to the frontend the kernel handed it (by default the "
        "clients send to the frontends' own ports in turn: AsyncClient.spread)",
    )
    parser.add_argument("--num-requests", type=int, default=1024)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=512, help="of each replica")
    parser.add_argument("--max-num-batched-tokens", type=int, default=16384)
    parser.add_argument("--device-ms", type=float, default=3.7, help="a step's device time")
    parser.add_argument(
        "--prefill-us", type=float, default=2.6, help="device time a prompt token adds to a step"
    )
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        help="Poisson passes of bench serve's clients at these rates instead (module doc)",
    )
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
    if min(args.replicas) < 1 or args.cores < 1:
        parser.error("--replicas and --cores must be at least 1")
    if min(args.device_ms, args.prefill_us) < 0:
        parser.error("--device-ms and --prefill-us must be at least 0")
    if args.request_rate and min(args.request_rate) <= 0:
        parser.error("--request-rate must be above 0")
    results, cores = {}, {}
    for r in args.replicas:
        cores[r] = args.cores if r % args.cores == 0 else 1
        results[r] = run(args, r, cores[r])
        profile = results[r].pop("profile", None)
        if profile is not None:
            print(f"\n{r} replica(s): the step loops' profile\n{profile}")
        if args.request_rate:
            _print_rates(r, cores[r], results[r].pop("rates"), args.output_len)
            continue
        for label, p in results[r].items():
            a = p["anatomy"]
            print(
                f"\n{r} replica(s) over {cores[r]} engine core(s), {label}: "
                f"{p['tok_per_s']:.0f} output tok/s"
            )
            if a is not None:
                print(
                    f"  steps {a.num_steps} ({a.num_decode_steps} decode-only), median decode "
                    f"step {fmt(a.median_decode_step_ms, '.2f')} ms, median rank idle "
                    f"{a.median_idle_ms:.2f} ms, engine turnaround {a.median_turnaround_ms:.2f} ms"
                )
            print(f"  {p['timeline']}")
            print(f"  {p['cpu']}")
            print(f"  {p['frontends']}")
            for c, threads in enumerate(p["core threads"]):
                print(f"  engine core {c}'s threads: {threads}")
    if args.request_rate:
        return
    print(
        "\n| replicas | engine cores | output | output tok/s | wall (s) | median TTFT (ms) | "
        "median decode step (ms) | median rank idle (ms) | against one message | "
        f"against {args.replicas[0]} replica(s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    first = results[args.replicas[0]]
    for r, passes in results.items():
        for label, p in passes.items():
            a = p["anatomy"]
            print(
                f"| {r} | {cores[r]} | {label} | {p['tok_per_s']:.0f} | {p['wall_s']:.2f} | "
                f"{p['ttft_ms']:.1f} | {fmt(a and a.median_decode_step_ms, '.2f')} | "
                f"{fmt(a and a.median_idle_ms, '.2f')} | "
                f"{p['tok_per_s'] / passes['one message']['tok_per_s']:.2f}x | "
                f"{p['tok_per_s'] / first[label]['tok_per_s']:.2f}x |"
            )


if __name__ == "__main__":
    main()
