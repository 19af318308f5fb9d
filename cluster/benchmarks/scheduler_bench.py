"""The scheduler alone, pure Python on the CPU (no Ray, no torch, no model): what one step of
planning costs, and how much of the KV cache it allocates without using.

    python -m cluster.benchmarks.scheduler_bench [--repeats 15] [--steps 100]

1. Step cost: 256 running requests decoding over a 16k-block cache (block_size 16, prefix
   caching on): the time of Scheduler.schedule() per step, and of Scheduler.update() that
   learns the step's tokens, the workers played by an instant answer. Median over --repeats
   runs of --steps steps each; then the same with NUM_QUEUED more requests waiting behind the
   full batch, under each policy (the queue must not make a step dearer while no seat is free).
2. Unused KV slots: a ShareGPT-like workload (lognormal prompt and output lengths, means about
   202 and 179 tokens) run to completion; after every step, the slots of allocated blocks that
   hold no computed token, summed over the steps, as a fraction of the allocated slots summed
   over the steps (busy steps weigh more). Median over runs.

Prints a markdown section for BENCHMARKS.md, naming the CPU.
"""

import argparse
import math
import os
import platform
import random
import statistics
import time

from scheduler.config import SchedulerConfig
from scheduler.core.page_table import PageTableManager
from scheduler.core.request import Request
from scheduler.core.scheduler import Scheduler
from scheduler.sampling_params import SamplingParams

BLOCK_SIZE = 16
NUM_BLOCKS = 16384
NUM_RUNNING = 256
NUM_QUEUED = 4096
MEAN_PROMPT, MEAN_OUTPUT = 202, 179
TOKEN = 7  # every "sampled" token


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def lognormal_lengths(rng: random.Random, count: int, mean: int, sigma: float = 1.0) -> list[int]:
    """Lengths with a long tail like ShareGPT's, mean about `mean`, within [1, 2048]."""
    mu = math.log(mean) - sigma**2 / 2
    return [min(max(round(rng.lognormvariate(mu, sigma)), 1), 2048) for _ in range(count)]


def make_request(rid: str, rng: random.Random, prompt_len: int, output_len: int) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=[rng.randrange(1000, 30000) for _ in range(prompt_len)],
        sampling_params=SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True),
        eos_token_ids=frozenset(),
        max_model_len=4096,
    )


def answer(scheduler: Scheduler, plan) -> tuple[list[str], list[int]]:
    """The ids that sample this step (computed tokens caught up with total) and their tokens."""
    scheduled = [r.request_id for r in plan.new_requests] + list(plan.cached_requests.request_ids)
    ids = [
        rid
        for rid in scheduled
        if (req := scheduler.requests.get(rid)) is not None
        and req.num_computed_tokens == req.num_tokens
    ]
    return ids, [TOKEN] * len(ids)


def step_cost_ms(
    rng: random.Random, num_steps: int, num_queued: int = 0, policy: str = "fcfs"
) -> tuple[float, float]:
    """Mean ms per step of schedule() and of update(), with NUM_RUNNING requests decoding and
    num_queued more waiting for a seat (which none frees while timed)."""
    page_table = PageTableManager(NUM_BLOCKS, BLOCK_SIZE)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=NUM_RUNNING, policy=policy).for_device(gpu=False), page_table
    )
    prompts = lognormal_lengths(rng, NUM_RUNNING + num_queued, MEAN_PROMPT)
    for i, prompt_len in enumerate(prompts):  # long outputs: all keep decoding while timed
        scheduler.add_request(make_request(f"r{i}", rng, min(prompt_len, 1024), 100_000))
    while len(scheduler.running) < NUM_RUNNING or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running
    ):  # prefill everything first
        scheduler.update(*answer(scheduler, scheduler.schedule()))
    schedule_s = update_s = 0.0
    for _ in range(num_steps):
        start = time.perf_counter()
        plan = scheduler.schedule()
        schedule_s += time.perf_counter() - start
        ids, tokens = answer(scheduler, plan)
        start = time.perf_counter()
        scheduler.update(ids, tokens)
        update_s += time.perf_counter() - start
        assert len(plan.cached_requests.request_ids) == NUM_RUNNING
    return schedule_s / num_steps * 1e3, update_s / num_steps * 1e3


def unused_slots(rng: random.Random, num_requests: int) -> tuple[float, float, float]:
    """(unused fraction of the allocated slot-steps, mean prompt length, mean output length)."""
    page_table = PageTableManager(NUM_BLOCKS, BLOCK_SIZE)
    scheduler = Scheduler(
        SchedulerConfig(max_num_seqs=NUM_RUNNING).for_device(gpu=False), page_table
    )
    prompts = lognormal_lengths(rng, num_requests, MEAN_PROMPT)
    outputs = lognormal_lengths(rng, num_requests, MEAN_OUTPUT)
    for i, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        scheduler.add_request(make_request(f"r{i}", rng, p, o))
    allocated = used = 0
    while scheduler.has_work():
        scheduler.update(*answer(scheduler, scheduler.schedule()))
        # Random prompts share no block: each held block is one running request's.
        allocated += BLOCK_SIZE * (page_table.num_blocks - page_table.num_free_blocks)
        used += sum(r.num_computed_tokens for r in scheduler.running)
    return 1 - used / allocated, statistics.fmean(prompts), statistics.fmean(outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--requests", type=int, default=2000, help="for the unused-slots run")
    args = parser.parse_args()

    costs = [step_cost_ms(random.Random(seed), args.steps) for seed in range(args.repeats)]
    queued_ms = {
        policy: statistics.median(
            step_cost_ms(random.Random(seed), args.steps, NUM_QUEUED, policy)[0]
            for seed in range(args.repeats)
        )
        for policy in ("fcfs", "cache_aware")
    }
    schedule_ms = statistics.median(c[0] for c in costs)
    update_ms = statistics.median(c[1] for c in costs)
    total_ms = statistics.median(c[0] + c[1] for c in costs)
    runs = [unused_slots(random.Random(seed), args.requests) for seed in range(3)]
    unused = statistics.median(r[0] for r in runs)
    prompt_mean = statistics.fmean(r[1] for r in runs)
    output_mean = statistics.fmean(r[2] for r in runs)

    print("## Scheduler (CPU)\n")
    print(
        f"`python -m cluster.benchmarks.scheduler_bench` on {cpu_name()} ({os.cpu_count()} "
        f"cores, load average {os.getloadavg()[0]:.2f} after the run), Python "
        f"{platform.python_version()}; pure Python, no model: the workers are an instant answer. "
        f"Block size {BLOCK_SIZE}, {NUM_BLOCKS} blocks, prefix caching on.\n"
    )
    print("| measure | result | target |")
    print("|---|---|---|")
    print(
        f"| scheduling one decode step of {NUM_RUNNING} running requests: schedule(), the plan "
        f"(median of {args.repeats} runs x {args.steps} steps) | {schedule_ms:.3f} ms | <= 1 ms |"
    )
    print(
        f"| the same step with update(), learning its {NUM_RUNNING} tokens "
        f"(stop checks, forks, finishes) | {total_ms:.3f} ms ({update_ms:.3f} for update) | |"
    )
    for policy, ms in queued_ms.items():
        print(
            f"| schedule() of the same step with {NUM_QUEUED} more requests queued, policy "
            f"{policy} | {ms:.3f} ms | as without the queue |"
        )
    print(
        f"| KV slots allocated but unused, over all steps; {args.requests} requests, lognormal "
        f"lengths, mean prompt {prompt_mean:.0f} / output {output_mean:.0f} tokens "
        f"(median of {len(runs)} runs) | {unused:.2%} | <= 4% |"
    )


if __name__ == "__main__":
    main()
