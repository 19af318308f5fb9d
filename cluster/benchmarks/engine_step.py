"""The engine's host work per step on the CPU: one replica's step loop (scheduler.core.engine)
driving a rank that answers at once, so every millisecond of a step is the engine's Python
(plan, send, receive, learn, the frontends' messages) and the gRPC between them. On a GPU this
time must hide under the device's step; what does not shows as the worker's idle time.

    python -m cluster.benchmarks.engine_step [--running 256] [--steps 400] [--profile]
    python -m cluster.benchmarks.engine_step --replicas 2 --running 256 --steps 300 \
        [--device-ms 2.5]

The rank runs in a process of its own (as a worker does) and answers each plan with one token
for every scheduled request (prompts are scheduled whole, so each one samples). The engine's
outputs go to a sink that serializes each message on another thread, as the engine core's link
to a frontend does. Reports, over the steps after the first 50 (all decodes of --running
requests): the median interval between learned steps, the engine's turnaround (from learning a
step to sending the next plan: what the device waits on when the engine is late), the mean
interval (the requests' prompts are equally long, so every BLOCK_SIZE-th step all of them start
a block at once and take the page table's general path: the mean counts those steps, the
median does not), the engine thread's CPU time per step (a mean, as the mean interval: less
swayed than the intervals by what else runs on a shared machine), and with --profile the
engine thread's cProfile.

--replicas N measures instead how engines share a process: the decode steps a second of one
engine, of N engines in this one process (threads under one interpreter lock, as the engine
core drives its replicas), and of N engines each in a process of its own. With --device-ms each
rank plays a GPU whose step takes that long (launched as soon as its plan arrives, as the worker
launches ahead): what a GPU would wait on the engines shows as the device idle.
"""

import argparse
import cProfile
import multiprocessing
import pstats
import queue
import statistics
import threading
import time

from cluster.benchmarks.modelless_rank import paced, serve_rank
from cluster.benchmarks.report import run_processes
from protos import frontend_pb2, worker_pb2, worker_pb2_grpc
from scheduler.config import SchedulerConfig
from scheduler.core.engine import Engine
from scheduler.core.page_table import PageTableManager
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler
from scheduler.core.worker_client import WorkerClient
from scheduler.sampling_params import SamplingParams

BLOCK_SIZE = 16
PROMPT_LEN = 16
WARMUP_STEPS = 50
TOKEN = 7


class _PacedRank(worker_pb2_grpc.WorkerServicer):
    """Rank 0 of a replica without a model: every scheduled request samples TOKEN, at once with
    device_ms 0, else at the pace of a device taking device_ms a step (modelless_rank.paced)."""

    def __init__(self, device_ms: float) -> None:
        self.device_ms = device_ms

    @staticmethod
    def _result(plan: worker_pb2.StepPlan, idle_s: float) -> worker_pb2.StepResult:
        ids = [r.request_id for r in plan.new_requests]
        ids += plan.cached_requests.request_ids
        return worker_pb2.StepResult(
            step_id=plan.step_id,
            request_ids=ids,
            token_ids=[TOKEN] * len(ids),
            idle_ms=idle_s * 1e3,
        )

    def Execute(self, request_iterator, context):
        return paced(request_iterator, self.device_ms, self._result)


class _SerializingSink:
    """A frontend link: each message is queued and serialized on another thread."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.num_messages = 0
        threading.Thread(target=self._drain, daemon=True).start()

    def send(self, outputs: frontend_pb2.StepOutputs) -> None:
        self._queue.put(frontend_pb2.CoreMessage(outputs=outputs))

    def _drain(self) -> None:
        while (message := self._queue.get()) is not None:
            message.SerializeToString()
            self.num_messages += 1


def run(running: int, steps: int, profile: bool) -> dict:
    ctx = multiprocessing.get_context("spawn")
    port, stop = ctx.Queue(), ctx.Event()
    rank = ctx.Process(target=serve_rank, args=(_PacedRank(0.0), port, stop), daemon=True)
    rank.start()
    worker = WorkerClient(f"127.0.0.1:{port.get(timeout=60)}")
    num_blocks = running * (-(-(PROMPT_LEN + steps + 1) // BLOCK_SIZE) + 1)
    config = SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=running * PROMPT_LEN)
    profiler = cProfile.Profile() if profile else None

    cpu_at_record: list[float] = []  # the engine thread's CPU time as each step is recorded

    class _Engine(Engine):
        def _record(self, learned) -> None:  # on the engine thread: nothing else learns here
            cpu_at_record.append(time.thread_time())
            super()._record(learned)

        def _loop(self) -> None:  # the engine thread's calls, profiled when asked
            if profiler is not None:
                profiler.enable()
            try:
                super()._loop()
            finally:
                if profiler is not None:
                    profiler.disable()

    page_table = PageTableManager(num_blocks, BLOCK_SIZE, True)
    engine = _Engine(Scheduler(config, page_table), [worker], max_step_records=steps + 1)
    sink = _SerializingSink()
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    try:
        with engine.lock:
            for i in range(running):
                prompt = [100 + (i * PROMPT_LEN + j) % 30000 for j in range(PROMPT_LEN)]
                request = Request(f"r{i}", prompt, params, frozenset([0]), max_model_len=4096)
                engine.add_request(request, sink)
        deadline = 600.0
        done = threading.Event()

        def finished() -> None:
            while engine.num_unfinished():
                if done.wait(0.05):
                    return
            done.set()

        watcher = threading.Thread(target=finished, daemon=True)
        watcher.start()
        if not done.wait(deadline):
            raise TimeoutError(f"the engine did not finish {running} x {steps} in {deadline} s")
        records = [
            r for r in list(engine.step_records)[WARMUP_STEPS:] if len(r.scheduled_ids) == running
        ]
        # Over the steps of all `running` decodes after the warm-up, every one of them.
        measured = cpu_at_record[WARMUP_STEPS : WARMUP_STEPS + len(records) + 1]
    finally:
        engine.stop()
        worker.close()
        stop.set()
        rank.join(timeout=10)
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    return {
        "steps": len(records),
        "interval_ms": statistics.median(r.interval_ms for r in records),
        "turnaround_ms": statistics.median(r.turnaround_ms for r in records),
        "mean_interval_ms": statistics.mean(r.interval_ms for r in records),
        "cpu_ms": (measured[-1] - measured[0]) / (len(measured) - 1) * 1e3,
    }


def _replicas_window(
    replicas: int, running: int, steps: int, device_ms: float = 0.0
) -> tuple[float, float, float]:
    """`replicas` engines in this process, each over a rank of its own (device_ms: see
    _PacedRank), each with `running` requests of `steps` tokens, all at once: (start, end)
    of the whole, time.monotonic(), and the ranks' device idle summed (s)."""
    ctx = multiprocessing.get_context("spawn")
    num_blocks = running * (-(-(PROMPT_LEN + steps + 1) // BLOCK_SIZE) + 1)
    config = SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=running * PROMPT_LEN)
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    ranks, engines = [], []
    try:
        for _ in range(replicas):
            port, stop = ctx.Queue(), ctx.Event()
            rank = ctx.Process(
                target=serve_rank, args=(_PacedRank(device_ms), port, stop), daemon=True
            )
            rank.start()
            ranks.append((rank, stop))
            worker = WorkerClient(f"127.0.0.1:{port.get(timeout=60)}")
            page_table = PageTableManager(num_blocks, BLOCK_SIZE, True)
            engine = Engine(Scheduler(config, page_table), [worker], max_step_records=steps + 8)
            engines.append((engine, worker))
        start = time.monotonic()
        for k, (engine, _) in enumerate(engines):
            sink = _SerializingSink()
            with engine.lock:
                for i in range(running):
                    prompt = [100 + (i * PROMPT_LEN + j) % 30000 for j in range(PROMPT_LEN)]
                    request = Request(f"e{k}r{i}", prompt, params, frozenset([0]), 4096)
                    engine.add_request(request, sink)
        deadline = start + 600.0
        while any(engine.num_unfinished() for engine, _ in engines):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replicas} engines did not finish {running} x {steps}")
            time.sleep(0.005)
        end = time.monotonic()
        idle_ms = sum(r.worker_idle_ms for e, _ in engines for r in e.step_records)
        return start, end, idle_ms / 1e3
    finally:
        for engine, worker in engines:
            engine.stop()
            worker.close()
        for rank, stop in ranks:
            stop.set()
            rank.join(timeout=10)


def _replica_process(
    running: int, steps: int, device_ms: float, windows: multiprocessing.Queue
) -> None:
    try:
        windows.put(_replicas_window(1, running, steps, device_ms))
    except Exception as e:  # told to the parent, which raises it
        windows.put(f"{type(e).__name__}: {e}")


def replicas_steps_per_s(
    replicas: int, running: int, steps: int, processes: bool, device_ms: float = 0.0
) -> tuple[float, float]:
    """Decode steps a second of `replicas` engines together (each `steps` steps of `running`
    requests over its own rank, instant or playing a device of device_ms a step), in this one
    process (their threads share one interpreter lock, as the engine core's replicas do) or each
    in a process of its own; and the ranks' device idle as a share of their time."""
    if not processes:
        spans = [_replicas_window(replicas, running, steps, device_ms)]
    else:
        spans = run_processes(
            multiprocessing.get_context("spawn"),
            _replica_process,
            [(running, steps, device_ms)] * replicas,
            660.0,
            "an engine's process",
            daemon=False,  # each starts its rank's process
        )
    # From the first engine's start to the last one's end: only their overlap is shared.
    wall = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    return replicas * steps / wall, sum(i for _, _, i in spans) / (replicas * wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--running", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--profile", action="store_true", help="cProfile the largest batch")
    parser.add_argument(
        "--replicas",
        type=int,
        default=0,
        help="instead: decode steps a second of 1 engine and of this many together, in one "
        "process and each in its own, at the largest --running",
    )
    parser.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help="with --replicas: each rank plays a device that takes this long a step (0: instant)",
    )
    args = parser.parse_args()
    if args.replicas:
        running, dev = max(args.running), args.device_ms
        one, idle = replicas_steps_per_s(1, running, args.steps, False, dev)
        print(f"ranks: {f'a device of {dev} ms a step' if dev else 'instant'}")
        print(
            "| replicas | engines in | decode steps / s, all replicas | against one | device idle |"
        )
        print("|---|---|---|---|---|")
        print(f"| 1 | one process | {one:.0f} | 1.00x | {100 * idle:.1f}% |")
        for processes, where in ((False, "one process"), (True, "a process each")):
            rate, idle = replicas_steps_per_s(args.replicas, running, args.steps, processes, dev)
            share = f"{rate / one:.2f}x | {100 * idle:.1f}%"
            print(f"| {args.replicas} | {where} | {rate:.0f} | {share} |")
        return
    print(
        "| running | steps | median interval (ms) | median turnaround (ms) | mean interval (ms) "
        "| engine thread CPU per step (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for running in args.running:
        profile = args.profile and running == max(args.running)
        r = run(running, args.steps, profile)
        print(
            f"| {running} | {r['steps']} | {r['interval_ms']:.3f} | {r['turnaround_ms']:.3f} "
            f"| {r['mean_interval_ms']:.3f} | {r['cpu_ms']:.3f} |"
        )


if __name__ == "__main__":
    main()
