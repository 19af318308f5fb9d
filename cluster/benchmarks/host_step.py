"""The worker's host work per decode step, on the CPU: what the device waits for between steps.

    python -m cluster.benchmarks.host_step [--batch-size 64 256] [--steps 200] [--prompt-len N]
        [--sampling greedy|random|top-p|penalized] [--profile]

A tiny Llama (one layer, hidden 64, vocabulary 1024, dummy weights) runs on the CPU, so its
forward pass costs little; it is timed apart (with the LM head's logits and argmax, the rest of
the device's work on a GPU) and taken out. For each batch size, batch-size requests of 128
tokens decode one token a step, sampling as --sampling says (report.SAMPLING's presets, greedy
by default), driven as WorkerService.Execute drives them (the next plan already there), with
--prompt-len a new prompt of N tokens beside them every step (it computes in that step and
leaves in the next, as worker_step's); per step, median ms:

    parse     the plan's wire bytes -> StepPlan (the gRPC reader thread's share)
    launch    runner.launch(plan) less the device work: plan diff -> inputs (the sampler's
              per-row parameters among them) -> the launch
    device    the model's forward pass and LM head (the tiny model's, on the CPU; a GPU runs
              them asynchronously, or replays them as a graph)
    sample    the sampler's tensor work (worker.sampler.sample; on a GPU, kernels queued), in
              none of the other columns
    finish    runner.finish(step): tokens -> per-request state -> StepResult
    result    StepResult -> wire bytes
    host      parse + launch + finish + result: the worker's host time per step

These are CPU timings of the host path only; the device's share is worker_step's. --profile
prints cProfile's top functions (by own time) over the steps of the largest batch, in a run
of their own.
"""

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cluster.benchmarks.report import add_sampling_argument
from cluster.benchmarks.worker_step import cache_sizes, decode_plans
from worker import model_runner
from worker.loader import load_model
from worker.model_runner import ModelRunner

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}
COLUMNS = ("parse", "launch", "device", "sample", "finish", "result", "host")


class DeviceTimer:
    """Sums the wall time of the calls that are the device's work on a GPU: the model's
    forward pass and its LM head's logits and argmax (wrapped on the instances), and apart,
    the sampler's (model_runner's `sample`, wrapped once; it times into the newest timer)."""

    newest: "DeviceTimer | None" = None

    def __init__(self, model: torch.nn.Module) -> None:
        self.total_ms = {"device": 0.0, "sample": 0.0}
        for owner, name in (
            (model, "forward"),
            (model.lm_head, "local_logits"),
            (model.lm_head, "greedy"),
        ):
            setattr(owner, name, self._timed(getattr(owner, name)))
        DeviceTimer.newest = self
        if not hasattr(model_runner.sample, "host_step_timed"):
            model_runner.sample = _timed_sample(model_runner.sample)

    def _timed(self, call: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = call(*args, **kwargs)
            self.total_ms["device"] += (time.perf_counter() - start) * 1e3
            return out

        return timed

    def take(self) -> dict[str, float]:
        """The time summed in each column since the last take, ms."""
        total, self.total_ms = self.total_ms, {"device": 0.0, "sample": 0.0}
        return total


def _timed_sample(call: Callable) -> Callable:
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = call(*args, **kwargs)
        DeviceTimer.newest.total_ms["sample"] += (time.perf_counter() - start) * 1e3
        return out

    timed.host_step_timed = True
    return timed


def tiny_runner(
    max_batch: int, context_len: int, steps: int, prompt_len: int = 0
) -> tuple[ModelRunner, DeviceTimer]:
    """A ModelRunner of the tiny Llama on the CPU, its cache sized for max_batch requests and
    two prompts of prompt_len tokens."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "config.json").write_text(json.dumps(TINY_LLAMA))
        model = load_model(tmp, "dummy", torch.float32, torch.device("cpu"), seed=0)
    runner = ModelRunner(model, torch.device("cpu"), torch.float32, seed=0)
    runner.init_cache(**cache_sizes(max_batch, context_len, steps, prompt_len))
    return runner, DeviceTimer(model)


def time_host(
    runner: ModelRunner, timer: DeviceTimer, plans: list, profiler: cProfile.Profile | None
) -> dict[str, float]:
    """Runs the decode plans launch-ahead, as WorkerService does; median ms of each column."""
    wire = [plan.SerializeToString() for plan in plans]
    parsed = type(plans[0])()
    parsed.ParseFromString(wire[0])
    runner.execute(parsed)  # the prefill, alone
    rows: list[dict[str, float]] = []
    launched = None
    for data in wire[1:-1]:
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        plan = type(plans[0])()
        plan.ParseFromString(data)
        t1 = time.perf_counter()
        timer.take()
        step = runner.launch(plan)
        t2 = time.perf_counter()
        device = timer.take()
        if launched is not None:
            result = runner.finish(launched)
            t3 = time.perf_counter()
            result.SerializeToString()
            t4 = time.perf_counter()
            row = {
                "parse": (t1 - t0) * 1e3,
                "launch": (t2 - t1) * 1e3 - device["device"] - device["sample"],
                "device": device["device"],
                "sample": device["sample"],
                "finish": (t3 - t2) * 1e3,
                "result": (t4 - t3) * 1e3,
            }
            row["host"] = row["parse"] + row["launch"] + row["finish"] + row["result"]
            rows.append(row)
        if profiler is not None:
            profiler.disable()
        launched = step
    runner.finish(launched)
    parsed.ParseFromString(wire[-1])
    runner.execute(parsed)
    rows = rows[len(rows) // 5 :]  # the first fifth warms up
    return {c: statistics.median(r[c] for r in rows) for c in COLUMNS}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--context-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt-len", type=int, default=0, help="a new prompt every step")
    parser.add_argument("--profile", action="store_true", help="cProfile of the largest batch")
    add_sampling_argument(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    max_batch = max(args.batch_size)
    runner, timer = tiny_runner(max_batch, args.context_len, args.steps, args.prompt_len)
    plans = functools.partial(
        decode_plans,
        context_len=args.context_len,
        steps=args.steps,
        first_block=0,
        prompt_len=args.prompt_len,
        vocab=TINY_LLAMA["vocab_size"],
        sampling=args.sampling,
    )
    print(f"| batch | {' | '.join(f'{c} (ms)' for c in COLUMNS)} |")
    print(f"|---|{'---|' * len(COLUMNS)}")
    for batch in args.batch_size:
        medians = time_host(runner, timer, plans(batch), None)
        print(f"| {batch} | {' | '.join(f'{medians[c]:.3f}' for c in COLUMNS)} |", flush=True)
    if args.profile:  # a run of its own: the profiler's overhead stays out of the timings
        profiler = cProfile.Profile()
        time_host(runner, timer, plans(max_batch), profiler)
        pstats.Stats(profiler).strip_dirs().sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
