"""What `pagedserve bench latency` and `pagedserve bench throughput` share: the config and the
cluster (started from a YAML config, on any free port), the workload's prompts and requests, the
roofline of a decode step and the anatomy of the engine's steps.

The roofline: a decode step reads every weight of its rank at least once, so it cannot take
less than (one rank's weight bytes) / (the card's memory bandwidth). The bandwidth is measured
in the benchmark's own process before the cluster starts (a device-to-device copy of a 1 GiB
buffer: bytes read + bytes written over the time, median of 10 after warm-up); without a CUDA
device no roofline applies.

The anatomy, from the scheduler's step records (scheduler.core.engine.StepRecord, as dicts):
interval_ms is a step's time (from learning the step before to learning it: with two steps in
flight, duration_ms spans the step before too), worker_ms rank 0's time in Execute (from the
launch to the answer, which waits for the step before on the device), worker_idle_ms rank 0's
device idle before this step (on CUDA the time between the step before's end and this step's
start, from CUDA events on the stream; on the CPU the host time since the tokens before arrived),
cuda_graph whether the step replayed a whole CUDA graph, piecewise_graph whether it replayed
the graphs in pieces, scheduled request id -> tokens computed.
"""

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass

COPY_BYTES = 1 << 30  # the buffer the bandwidth is measured with
COPY_REPEATS = 10
COPY_WARMUP = 3


# --- the step anatomy -------------------------------------------------------------------------


def is_decode_step(record: dict) -> bool:
    """A step in which every scheduled request computes one token (no prompt tokens)."""
    scheduled = record["scheduled"]
    return bool(scheduled) and all(n == 1 for n in scheduled.values())


def decode_steps(records: list[dict]) -> list[dict]:
    return [r for r in records if is_decode_step(r)]


def records_between(records: list[dict], start: float, end: float) -> list[dict]:
    """The records of the steps that started within [start, end] (time.monotonic() seconds:
    system-wide on Linux, so comparable with the scheduler actor's on this node)."""
    return [r for r in records if start <= r["start"] <= end]


def _triton_cache_dir() -> str:
    return os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")


def triton_cache_entries() -> frozenset[str] | None:
    """The entries of this node's Triton cache (TRITON_CACHE_DIR, else ~/.triton/cache), a
    directory per compiled kernel variant; None without a cache. The workers of a one-node
    cluster compile into it: entries new after a timed pass mean the pass paid for compiling."""
    try:
        return frozenset(os.listdir(_triton_cache_dir()))
    except OSError:
        return None


def _kernel_name(entry: str) -> str:
    """The kernel an entry of the cache was compiled for: its metadata file's name (the one
    .json not named __grp__*), else the entry's own."""
    try:
        files = os.listdir(os.path.join(_triton_cache_dir(), entry))
    except OSError:
        return entry
    names = [f[:-5] for f in files if f.endswith(".json") and not f.startswith("__grp__")]
    return min(names) if names else entry


def format_compiled(before: frozenset[str] | None, after: frozenset[str] | None) -> str:
    """One line: how many Triton kernel variants were compiled on this node between the two
    listings, and of which kernels ("_prefill_kernel x2": two variants of it)."""
    if before is None or after is None:
        return "Triton kernels compiled during the timed pass: no Triton cache on this node"
    counts = Counter(_kernel_name(entry) for entry in after - before)
    line = f"Triton kernels compiled during the timed pass (this node's cache): {counts.total()}"
    if counts:
        kernels = (name if n == 1 else f"{name} x{n}" for name, n in sorted(counts.items()))
        line += f" ({', '.join(kernels)})"
    return line


def format_timeline(records: list[dict], start: float, end: float) -> str:
    """Where the engines' steps fell in a pass of the clients from start to end (time.monotonic()
    seconds): the first plan sent and the last step learned, from the clients' start, and the
    time within the pass with no step in flight on any replica (before, between and after)."""
    wall = end - start
    if not records:
        return f"engine steps: none within the clients' {wall:.2f} s"
    spans = sorted((r["start"], r["start"] + r["duration_ms"] / 1e3) for r in records)
    busy, (lo, hi) = 0.0, spans[0]
    for a, b in spans[1:]:
        if a > hi:
            busy, lo = busy + hi - lo, a
        hi = max(hi, b)
    busy += hi - lo
    return (
        f"engine steps from +{spans[0][0] - start:.2f} s to "
        f"+{max(b for _, b in spans) - start:.2f} s of the clients' {wall:.2f} s; "
        f"no step in flight for {max(0.0, wall - busy):.2f} s of it"
    )


@dataclass(frozen=True)
class Anatomy:
    num_steps: int
    num_decode_steps: int
    median_step_ms: float
    median_decode_step_ms: float | None  # None when no step was decode-only
    median_worker_ms: float  # rank 0's time in Execute
    median_idle_ms: float  # rank 0's device idle between steps
    median_turnaround_ms: float  # the engine's, from learning a step to sending the next plan
    idle_pct: float  # median_idle_ms as % of median_step_ms
    graph_hit_decode: float | None  # fraction of decode-only steps that replayed a CUDA graph
    graph_hit_all: float  # fraction of all steps that did
    piecewise_all: float  # fraction of all steps that replayed the graphs in pieces
    # Where the steps' time went: the sums of their intervals, decode-only steps and the others
    # (steps with prompt tokens: eager, longer), and rank 0's idle summed over the steps sent
    # right after a learned one (a turnaround above 0): a step that starts a busy period
    # counts the engine's wait for work (the pause before a pass) as its idle.
    decode_steps_s: float
    other_steps_s: float
    median_other_step_ms: float | None  # None when every step was decode-only
    idle_s: float
    decode_idle_s: float  # the part of idle_s before decode-only steps

    @property
    def mean_decode_step_ms(self) -> float | None:
        """The decode-only steps' time over their number. Unlike their median it holds when the
        intervals alternate: a worker whose launch waits for the device answers the step
        before only as the next one ends, two answers close together, then a long gap."""
        if not self.num_decode_steps:
            return None
        return 1e3 * self.decode_steps_s / self.num_decode_steps


def step_anatomy(records: list[dict]) -> Anatomy | None:
    """The anatomy of some steps; None when there are none."""
    if not records:
        return None
    decodes = decode_steps(records)
    others = [r["interval_ms"] for r in records if not is_decode_step(r)]
    step = statistics.median(r["interval_ms"] for r in records)
    worker = statistics.median(r["worker_ms"] for r in records)
    idle = statistics.median(r["worker_idle_ms"] for r in records)
    return Anatomy(
        num_steps=len(records),
        num_decode_steps=len(decodes),
        median_step_ms=step,
        median_decode_step_ms=(
            statistics.median(r["interval_ms"] for r in decodes) if decodes else None
        ),
        median_worker_ms=worker,
        median_idle_ms=idle,
        median_turnaround_ms=statistics.median(r["turnaround_ms"] for r in records),
        idle_pct=100 * idle / step if step > 0 else float("nan"),
        graph_hit_decode=(
            sum(bool(r["cuda_graph"]) for r in decodes) / len(decodes) if decodes else None
        ),
        graph_hit_all=sum(bool(r["cuda_graph"]) for r in records) / len(records),
        piecewise_all=sum(bool(r["piecewise_graph"]) for r in records) / len(records),
        decode_steps_s=sum(r["interval_ms"] for r in decodes) / 1e3,
        other_steps_s=sum(others) / 1e3,
        median_other_step_ms=statistics.median(others) if others else None,
        idle_s=_idle_s(records),
        decode_idle_s=_idle_s(decodes),
    )


def _idle_s(records: list[dict]) -> float:
    return sum(r["worker_idle_ms"] for r in records if r["turnaround_ms"] > 0) / 1e3


def format_anatomy(anatomy: Anatomy | None, what: str = "timed steps") -> list[str]:
    if anatomy is None:
        return [f"step anatomy ({what}): no step records"]
    a = anatomy
    decode = "-" if a.median_decode_step_ms is None else f"{a.median_decode_step_ms:.2f} ms"
    hits = "-" if a.graph_hit_decode is None else f"{100 * a.graph_hit_decode:.1f}%"
    return [
        f"step anatomy ({what}):",
        f"  steps: {a.num_steps} ({a.num_decode_steps} decode-only)",
        f"  median step: {a.median_step_ms:.2f} ms (decode-only steps: {decode})",
        f"  median worker Execute (rank 0): {a.median_worker_ms:.2f} ms",
        f"  median worker idle between steps: {a.median_idle_ms:.2f} ms "
        f"({a.idle_pct:.1f}% of the median step)",
        f"  median engine turnaround (a step learned -> the next plan sent): "
        f"{a.median_turnaround_ms:.2f} ms",
        f"  CUDA graph hit rate: {hits} of decode-only steps, {100 * a.graph_hit_all:.1f}% of "
        f"all steps; {100 * a.piecewise_all:.1f}% of all steps in pieces",
        f"  time in steps: {a.decode_steps_s:.2f} s decode-only, {a.other_steps_s:.2f} s in the "
        f"{a.num_steps - a.num_decode_steps} others (median {fmt(a.median_other_step_ms, '.2f')} "
        f"ms); worker idle {a.idle_s:.2f} s in the steps sent right after one learned, "
        f"{a.decode_idle_s:.2f} s of it before decode-only steps "
        f"({fmt(100 * a.decode_idle_s / a.decode_steps_s if a.decode_steps_s else None, '.1f')}% "
        f"of their time)",
    ]


# --- the roofline ----------------------------------------------------------------------------


def roofline_ms(weight_bytes: int, bandwidth: float) -> float:
    """The least time of a decode step that reads weight_bytes at bandwidth bytes/s, in ms."""
    return weight_bytes / bandwidth * 1e3


def copy_bandwidth(nbytes: int, times_s: list[float]) -> float:
    """Bytes/s of copies of nbytes (each reads nbytes and writes nbytes), from their times."""
    return 2 * nbytes / statistics.median(times_s)


def measure_copy_bandwidth(
    nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS, warmup: int = COPY_WARMUP
) -> float | None:
    """This process's CUDA device's device-to-device copy bandwidth (bytes read + written per
    second, median of `repeats` copies timed with CUDA events); None without a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()  # the workers get the card's memory back
    return copy_bandwidth(nbytes, times)


@dataclass(frozen=True)
class Roofline:
    card: str  # the workers' device, as server_info names it
    weight_bytes: int  # one rank's parameters
    bandwidth: float | None  # bytes/s; None: no roofline applies
    why_none: str = ""

    @property
    def ms(self) -> float | None:
        return None if self.bandwidth is None else roofline_ms(self.weight_bytes, self.bandwidth)


def make_roofline(card: str, weight_bytes: int, bandwidth: float | None) -> Roofline:
    """The roofline of a card given the bandwidth measured in this process (None if none)."""
    if not card.startswith("cuda"):
        return Roofline(card, weight_bytes, None, f"the card is {card}, not a CUDA device")
    if bandwidth is None:
        return Roofline(card, weight_bytes, None, "this process sees no CUDA device to measure")
    return Roofline(card, weight_bytes, bandwidth)


def roofline_pct(roofline: Roofline, measured_ms: float | None) -> float | None:
    """The roofline's time as % of a measured decode step (100% = at the roofline)."""
    if roofline.ms is None or not measured_ms:
        return None
    return 100 * roofline.ms / measured_ms


def format_roofline(roofline: Roofline, measured_ms: float | None = None) -> list[str]:
    """The card, the roofline of a decode step and, given one, the measured step beside it."""
    lines = [f"card: {roofline.card}"]
    weights = f"{roofline.weight_bytes / 1e6:.1f} MB of weights per rank"
    if roofline.ms is None:
        lines.append(f"roofline: none applies ({roofline.why_none}); {weights}")
        return lines
    lines.append(
        f"roofline: {weights} / {roofline.bandwidth / 1e9:.0f} GB/s (device-to-device copy of "
        f"{COPY_BYTES >> 30} GiB, bytes read + written, median of {COPY_REPEATS}, measured in this "
        f"run) = {roofline.ms:.3f} ms per decode step"
    )
    if measured_ms:
        lines.append(
            f"measured: {measured_ms:.3f} ms per decode step (the roofline is "
            f"{roofline_pct(roofline, measured_ms):.1f}% of it)"
        )
    return lines


# --- the config, the cluster and the workload -------------------------------------------------


# bench throughput's and bench latency's --sampling: the SamplingParams fields each request
# gets beside max_tokens and ignore_eos. greedy draws nothing (the LM head's argmax); random
# samples the whole distribution (vLLM's benchmarks' default); seeded does too, each request
# from generators of its own seed (one a row and step: the draw depends on nothing else); top-p
# and penalized take the sampler's other paths (candidates and their check; counts of each
# row's tokens).
SAMPLING = {
    "greedy": {"temperature": 0.0},
    "random": {"temperature": 1.0},
    "seeded": {"temperature": 1.0, "seed": 1234},
    "top-p": {"temperature": 0.8, "top_p": 0.95},
    "penalized": {
        "temperature": 0.0,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.5,
        "repetition_penalty": 1.1,
    },
}


def add_sampling_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sampling",
        choices=sorted(SAMPLING),
        default="greedy",
        help="how every request samples: " + "; ".join(f"{k} {v}" for k, v in SAMPLING.items()),
    )


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        default=None,
        help="YAML config (default: the built-in one, as configs/local.yaml)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")


@dataclass
class BenchCluster:
    config: object  # cluster.config.Config
    cluster: object  # cluster.launcher.Cluster
    address: str
    vocab_size: int
    roofline: Roofline

    def step_records(self) -> list[dict]:
        """The latest steps of every replica (each keeps a bounded window of them)."""
        return self.cluster.step_records()

    def server_pids(self) -> dict[str, list[int]]:
        """The engine cores' processes and the frontends', by role (ProcessCpu's argument)."""
        import ray

        cluster = self.cluster
        cores = ray.get([s.pid.remote() for s in cluster.schedulers], timeout=30)
        frontends = ray.get([f.pid.remote() for f in cluster.frontends], timeout=30)
        return {"engine core": cores, "frontends": frontends}

    def frontends_streamed(self) -> list[tuple[int, float | None, float | None]]:
        """Each frontend's FrontendServer.streamed() (tokens sent so far, its last message's
        time, its last core message's), in the order of server_pids()'s frontends."""
        import ray

        return ray.get([f.streamed.remote() for f in self.cluster.frontends], timeout=30)

    def num_steps(self) -> int:
        """Steps learned so far over all replicas (not bounded by the records' window)."""
        from cluster.client import Client

        with Client(self.address) as client:
            return client.server_info().num_steps


def process_cpu_s(pid: int) -> float | None:
    """A process's user + system CPU seconds so far, all its threads (/proc/PID/stat); None
    where this machine cannot see it (a process on another node)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ProcessCpu:
    """How busy the server's processes were over a window: each one's CPU time over the wall
    time (1.0 = one core), the engine core and every frontend. A process near 1.0 is the
    bound of a workload whose device idles."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids  # role ("engine core", "frontends") -> its processes
        self._start = time.monotonic()
        self._cpu = {role: [process_cpu_s(p) for p in ps] for role, ps in pids.items()}

    def shares(self) -> dict[str, list[float]]:
        """Each role's processes' share of one core since construction (those seen twice)."""
        wall = time.monotonic() - self._start
        out = {}
        for role, pids in self.pids.items():
            now = [process_cpu_s(p) for p in pids]
            out[role] = [
                (b - a) / wall
                for a, b in zip(self._cpu[role], now, strict=True)
                if a is not None and b is not None
            ]
        return out


def format_process_cpu(shares: dict[str, list[float]], what: str = "server processes'") -> str:
    """One line: each role's CPU share over the window (a range and mean for several)."""
    parts = []
    for role, values in shares.items():
        if not values:
            parts.append(f"{role} not on this node")
        elif len(values) == 1:
            parts.append(f"{role} {values[0]:.0%}")
        else:
            parts.append(
                f"{role} {min(values):.0%}-{max(values):.0%} "
                f"(mean {statistics.mean(values):.0%}, {len(values)} processes)"
            )
    return f"{what} CPU over the timed pass (100% = one core): " + "; ".join(parts)


def format_frontends(
    before: list[tuple[int, float | None, float | None]],
    after: list[tuple[int, float | None, float | None]],
    cpu: list[float],
    start: float,
) -> str:
    """One line: each frontend's share of a pass's output tokens, its CPU share, when its last
    message of the pass went and when its last outputs came from the cores, from the pass's
    start (a frontend whose last message trails its last core message by far is behind; one
    whose core messages come late, behind the core's link). before, after: each frontend's
    FrontendServer.streamed() around the pass (in the same order as cpu); start:
    time.monotonic()."""
    sent = [b[0] - a[0] for a, b in zip(before, after, strict=True)]
    total = sum(sent) or 1
    parts = []
    for n, (_, last, core), share in zip(sent, after, cpu, strict=True):
        if last is None or core is None or not n:
            when = "-"
        else:
            when = f"+{last - start:.2f} s (its last core message +{core - start:.2f} s)"
        parts.append(f"{n / total:.0%} of the tokens at {share:.0%} CPU, last message {when}")
    return "frontends: " + "; ".join(parts)


@contextlib.contextmanager
def bench_cluster(config_path: str | None, overrides: list[str]) -> Iterator[BenchCluster]:
    """Loads the config (any free port), measures the copy bandwidth when the workers may run
    on CUDA, starts the cluster and stops it on leaving."""
    from cluster.client import Client
    from cluster.config import load_config
    from cluster.launcher import Cluster

    config = load_config(config_path, [*overrides, "server.port=0", "server.http_port=0"])
    bandwidth = None
    if config.model.device != "cpu":
        bandwidth = measure_copy_bandwidth()  # before the workers take the card's memory
    cluster = Cluster(config)
    try:
        address = cluster.start()
        with Client(address) as client:
            info = client.model_info()
            rank0 = client.server_info().replicas[0].workers[0]
            card = rank0.device
            if rank0.all_reduce:
                card += f"; tensor-parallel all-reduce: {rank0.all_reduce}"
        roofline = make_roofline(card, info.weight_bytes, bandwidth)
        yield BenchCluster(config, cluster, address, info.vocab_size, roofline)
    finally:
        cluster.shutdown()


def make_prompts(num: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """num prompts of input_len random token ids (none below 100: no special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num)]


def run_workload(
    address: str,
    prompts: list[list[int]],
    output_len: int,
    stream: bool = False,
    clients: int = 1,
    connections: int = 1,
    spread: bool = True,
    sampling: str = "greedy",
) -> dict:
    """Sends every prompt at once (ignore_eos, exactly output_len tokens each, sampling as
    SAMPLING[sampling]) and waits for all: requests, output tokens, wall time, output tokens/s,
    the median TTFT and each client process's CPU share over its pass (near 100%: the figure
    measures the client).

    clients > 1 splits the prompts round-robin over that many client processes, each with its
    own connection (so the server's frontends, which share the port, each take some): one
    Python process reading streamed tokens saturates near 7k messages a second, which would
    measure the client, not the server. They start sending together; the wall time runs from
    that start to the last answer.

    connections > 1: each client process sends its prompts round-robin over that many
    connections of its own. The server's frontends share its port and each connection is
    served by one of them, as the kernel hands it out: 16 connections over 8 frontends leave
    some frontends four and some none, which moves a streamed figure by a third from run to
    run. spread: each client sends its requests to the frontends' own ports in turn instead
    (AsyncClient.spread), every frontend an even share.
    """
    if clients <= 1:
        one = _send_all(address, prompts, output_len, stream, None, connections, spread, sampling)
        parts = [asyncio.run(one)]
    else:
        ctx = multiprocessing.get_context("spawn")
        ready = ctx.Barrier(clients)
        parts = run_processes(
            ctx,
            _client_process,
            [
                (
                    address,
                    prompts[i::clients],
                    output_len,
                    stream,
                    ready,
                    connections,
                    spread,
                    sampling,
                )
                for i in range(clients)
            ],
            _CLIENT_TIMEOUT_S,
            "a client process",
        )
    counts = [c for part in parts for c in part.counts]
    ttfts = [t for part in parts for t in part.ttfts_s]
    wall = max(part.end for part in parts) - min(part.start for part in parts)
    return {
        "requests": len(prompts),
        "output_tokens": sum(counts),
        "wall_s": wall,
        "tok_per_s": sum(counts) / wall,
        "ttft_ms": statistics.median(ttfts) * 1e3,
        "client_cpu": [part.cpu_s / (part.end - part.start) for part in parts],
        "start": min(part.start for part in parts),
        "end": max(part.end for part in parts),
    }


_CLIENT_TIMEOUT_S = 3600.0


def run_processes(
    ctx, target, args: list[tuple], timeout: float, what: str, daemon: bool = True
) -> list:
    """target(*a, results) in a process of ctx for each a of args; each puts one result on
    results (a queue of ctx), or its error as a string. The results in the order they came;
    RuntimeError naming the first failure (what: how the processes are called). daemon=False
    for targets that start processes of their own."""
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, results), daemon=daemon) for a in args]
    for proc in procs:
        proc.start()
    try:
        parts = [results.get(timeout=timeout) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    errors = [part for part in parts if isinstance(part, str)]
    if errors:
        raise RuntimeError(f"{what} failed: {errors[0]}")
    return parts


@dataclass
class _ClientResult:
    counts: list[int]  # output tokens, one per request
    ttfts_s: list[float]
    start: float  # time.monotonic(): system-wide on Linux, comparable across processes
    end: float
    cpu_s: float  # the process's CPU time (all its threads) from start to end


def run_client(client: Coroutine, ready, results) -> None:
    """In a client process of run_processes: puts the result of running client on results, or
    its error as a string (for the parent to raise), breaking the barrier ready the clients
    start together at so that the others stop waiting."""
    try:
        result = asyncio.run(client)
    except Exception as e:
        ready.abort()
        results.put(f"{type(e).__name__}: {e}")
    else:
        results.put(result)


def _client_process(
    address: str,
    prompts: list[list[int]],
    output_len: int,
    stream: bool,
    ready,  # multiprocessing Barrier: every client connected
    connections: int,
    spread: bool,
    sampling: str,
    results,  # multiprocessing Queue: a _ClientResult, or the error as a string
) -> None:
    send = _send_all(address, prompts, output_len, stream, ready, connections, spread, sampling)
    run_client(send, ready, results)


async def _send_all(
    address: str,
    prompts: list[list[int]],
    output_len: int,
    stream: bool,
    ready=None,
    connections: int = 1,
    spread: bool = True,
    sampling: str = "greedy",
) -> _ClientResult:
    from cluster.client import AsyncClient
    from cluster.outputs import OutputCollector
    from scheduler.sampling_params import RequestOutputKind, SamplingParams

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    params = SamplingParams(
        max_tokens=output_len, ignore_eos=True, output_kind=kind, **SAMPLING[sampling]
    )
    clients = [AsyncClient(address, own_connection=connections > 1) for _ in range(connections)]
    ttfts: list[float] = []

    async def one(prompt: list[int], client: AsyncClient) -> int:
        start = time.monotonic()
        collector = OutputCollector()
        first = stream
        async for msg in client.generate(prompt, params, timeout=_CLIENT_TIMEOUT_S):
            if first and msg.token_ids:  # the first message that carries a token
                ttfts.append(time.monotonic() - start)
                first = False
            collector.add(msg)
        out = collector.result().outputs[0]
        if not stream:
            ttfts.append(out.timings.time_to_first_token_ms * 1e-3)
        return len(out.token_ids)

    try:
        for client in clients:
            await client.wait_until_ready(timeout=60)
            if spread:
                await client.spread()
        if ready is not None:
            ready.wait(timeout=120)  # the clients start sending together
        start, cpu = time.monotonic(), time.process_time()
        counts = await asyncio.gather(
            *(one(p, clients[i % connections]) for i, p in enumerate(prompts))
        )
        return _ClientResult(counts, ttfts, start, time.monotonic(), time.process_time() - cpu)
    finally:
        for client in clients:
            await client.close()


def fmt(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    """A table cell: `missing` for None."""
    return missing if value is None else format(value, spec)
