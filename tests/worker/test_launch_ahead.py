"""The worker launches step N+1 before it answers step N when plan N+1 is already there: the
tokens must be exactly those of running the plans one at a time, for greedy, seeded, unseeded,
penalized and min_tokens rows, with requests arriving and leaving in between."""

import time
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import worker
from protos import worker_pb2
from worker.loader import load_model
from worker.model_runner import ModelRunner
from worker.worker import WorkerService

BLOCK = 4

SAMPLING = {
    "greedy": worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0),
    "seeded": worker_pb2.SamplingOptions(temperature=0.9, top_p=0.9, seed=7),
    "unseeded": worker_pb2.SamplingOptions(temperature=1.0, top_p=1.0, top_k=20),
    "penalized": worker_pb2.SamplingOptions(
        temperature=0.0, top_p=1.0, repetition_penalty=1.5, frequency_penalty=0.5
    ),
    "min_tokens": worker_pb2.SamplingOptions(
        temperature=0.8, top_p=1.0, seed=3, min_tokens=6, banned_until_min_tokens=[1, 2, 3]
    ),
}


def plans(prompts: dict[str, list[int]], steps: int, late: str, leaves: str) -> list:
    """Plans that never depend on sampled values: every request prefills, then decodes each
    step. `late` arrives at step 3; `leaves` is dropped after step 5."""
    out, computed, tables, next_block = [], {}, {}, 0
    for step in range(1, steps + 1):
        plan = worker_pb2.StepPlan(step_id=step)
        for rid, prompt in prompts.items():
            if (rid == late and step < 3) or (rid == leaves and step > 5):
                continue
            done = computed.get(rid, 0)
            total = len(prompt) + max(step - (3 if rid == late else 1), 0)
            n = total - done if rid in computed else len(prompt)
            blocks_needed = -(-(done + n) // BLOCK)
            have = len(tables.get(rid, []))
            new = list(range(next_block, next_block + blocks_needed - have))
            next_block += len(new)
            tables.setdefault(rid, []).extend(new)
            if rid not in computed:
                plan.new_requests.append(
                    worker_pb2.NewRequest(
                        request_id=rid,
                        token_ids=prompt,
                        sampling=SAMPLING[rid.split("-")[0]],
                        block_ids=new,
                        num_scheduled_tokens=n,
                    )
                )
            else:
                c = plan.cached_requests
                c.request_ids.append(rid)
                c.num_computed_tokens.append(done)
                c.num_scheduled_tokens.append(n)
                c.num_new_blocks.append(len(new))
                c.new_block_ids.extend(new)
                c.replace_block_table.append(False)
            computed[rid] = done + n
        if step == 6:
            plan.finished_request_ids.append(leaves)
        out.append(plan)
    return out


def random_prompts(names: list[str], seed: int) -> dict[str, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return {
        rid: torch.randint(4, 250, (int(torch.randint(3, 11, (1,), generator=gen)),)).tolist()
        for rid in names
    }


def runner_with_cache(path, device: str, num_blocks: int = 256) -> ModelRunner:
    """A float32 runner of the model at path, its cache num_blocks blocks of BLOCK tokens, 64
    tokens a request at most, decode graphs on CUDA."""
    dev = torch.device(device)
    model = load_model(str(path), "auto", torch.float32, dev, seed=0)
    runner = ModelRunner(model, dev, torch.float32, seed=0)
    runner.init_cache(
        num_blocks=num_blocks,
        block_size=BLOCK,
        max_num_seqs=8,
        max_model_len=64,
        enforce_eager=False,
    )
    return runner


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_launching_ahead_gives_the_tokens_of_one_step_at_a_time(tiny_llama_dir, device):
    path, _ = tiny_llama_dir
    names = ["greedy-a", "greedy-b", "seeded-a", "unseeded-a", "penalized-a", "penalized-b"]
    names.append("min_tokens-a")
    prompts = random_prompts(names, seed=1)
    # The penalized rows count their token in flight from the device: every step after the
    # first launches ahead, one of them leaving after step 5.
    steps = plans(prompts, steps=12, late="seeded-a", leaves="penalized-a")

    one_at_a_time = runner_with_cache(path, device)
    want = [one_at_a_time.execute(plan) for plan in steps]

    service = WorkerService(on_shutdown=None)
    service.runner = runner = runner_with_cache(path, device)
    launched_ahead = []  # per launch: did a request still wait for a token of the step before?
    launch = runner.launch

    def recording_launch(plan):
        rows = [s.row for s in runner.requests.values()]
        launched_ahead.append(
            bool((runner.rows.num_tokens[rows] > runner.rows.num_known[rows]).any())
        )
        return launch(plan)

    runner.launch = recording_launch
    got = list(service.Execute(iter(steps), context=None))

    assert [r.step_id for r in got] == [p.step_id for p in steps]
    for w, g in zip(want, got, strict=True):
        assert list(g.request_ids) == list(w.request_ids)
        assert list(g.token_ids) == list(w.token_ids), f"step {g.step_id}"
    # Every scheduled request samples in every step (each step computes up to its end).
    scheduled = [len(p.new_requests) + len(p.cached_requests.request_ids) for p in steps]
    assert [len(r.token_ids) for r in got] == scheduled
    assert launched_ahead == [False] + [True] * 11


# aten ops whose CUDA implementation needs a value on the host, so the host waits for the
# stream: .item() / bool() / int() of a tensor, outputs sized by their data. index_put_ is one
# when its value is a 0-dim tensor: `t[rows, ids] = True` makes a CPU scalar tensor, which
# index_put_ copies to t's device with a blocking copy.
WAITS_FOR_THE_DEVICE = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "unique"}
INDEX_PUT = {"index_put", "index_put_", "_index_put_impl_"}
PACKAGES = tuple(str(Path(p.__file__).parent) for p in (worker, kernels))


class HostWaits(TorchDispatchMode):
    """Records (aten op, the worker function calling it) for each op that would make the host
    wait for a CUDA stream."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[tuple[str, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in WAITS_FOR_THE_DEVICE or (name in INDEX_PUT and args[2].dim() == 0):
            stack = traceback.extract_stack()
            caller = next(f.name for f in reversed(stack) if f.filename.startswith(PACKAGES))
            self.found.add((name, caller))
        return func(*args, **(kwargs or {}))


# The CPU's own paths, which CUDA never takes: the reference attention's decode groups, and
# the top-k / top-p loop asking whether rows are settled (on CUDA the floor kernel answers).
CPU_ONLY_WAITS = {("nonzero", "_decode_group"), ("_local_scalar_dense", "_mask_top_k_top_p")}


def test_a_launch_runs_no_op_that_waits_for_the_device(tiny_llama_dir):
    """The CPU's check of what the GPU test below measures: launching steps of prompts and
    decodes whose rows sample greedy, seeded top-p, unseeded top-k, penalized (with a token in
    flight) and under min_tokens bans runs no aten op that would make the host wait for a
    CUDA stream, outside the CPU's own paths."""
    path, _ = tiny_llama_dir
    names = ["greedy-a", "seeded-a", "unseeded-a", "penalized-a", "penalized-b", "min_tokens-a"]
    steps = plans(random_prompts(names, seed=3), steps=8, late="penalized-b", leaves="seeded-a")
    runner = runner_with_cache(path, "cpu")
    waits = HostWaits()
    step = None
    for plan in steps:  # each launched while the step before is in flight
        with waits:
            launched = runner.launch(plan)
        if step is not None:
            runner.finish(step)
        step = launched
    runner.finish(step)
    assert waits.found - CPU_ONLY_WAITS == set()


@pytest.mark.gpu
def test_device_idle_is_the_gap_on_the_stream(tiny_llama_dir):
    """idle_ms is the device's: a host pause between two steps is counted, a step launched
    while the one before still runs (queued behind it) has none."""
    path, _ = tiny_llama_dir
    prompts = {"greedy-a": [5, 6, 7, 8, 9], "greedy-b": [10, 11, 12]}
    steps = plans(prompts, steps=4, late="none", leaves="none")
    runner = runner_with_cache(path, "cuda")
    runner.execute(steps[0])
    time.sleep(0.05)  # the device has nothing queued for these 50 ms
    paused = runner.execute(steps[1])
    assert 50.0 <= paused.idle_ms < 1000.0
    torch.cuda._sleep(200_000_000)  # keeps the stream busy while both steps launch
    first = runner.launch(steps[2])
    second = runner.launch(steps[3])  # queued behind the first on the stream
    runner.finish(first)
    assert runner.finish(second).idle_ms < 0.5


@pytest.mark.gpu
def test_a_launch_queues_its_step_without_waiting_for_the_device(tiny_llama_dir):
    """launch() only queues work: with the stream held busy by a spin, each step's launch
    returns while the spin still runs. The steps hold prompts riding the whole graph beside
    decodes (only their last rows sample: an index moved to the device) and penalized and
    min_tokens rows (tensors built on the host); a blocking host-to-device copy of any of them
    synchronizes the stream, and the step launched ahead would then overlap nothing."""
    path, _ = tiny_llama_dir
    prompts = random_prompts(["greedy-a", "greedy-b", "penalized-a", "min_tokens-a"], seed=2)
    steps = plans(prompts, steps=8, late="greedy-b", leaves="penalized-a")
    warm = runner_with_cache(path, "cuda")
    for plan in steps:  # compiles every kernel variant these steps use before the spins
        warm.execute(plan)
    runner = runner_with_cache(path, "cuda")
    waited, prompt_graph_steps = [], []
    for plan in steps:
        spin_done = torch.cuda.Event()
        torch.cuda._sleep(500_000_000)  # ~0.25 s of the device, far beyond a launch's host time
        spin_done.record()
        step = runner.launch(plan)
        waited.append(spin_done.query())
        result = runner.finish(step)
        if plan.new_requests and result.cuda_graph:
            prompt_graph_steps.append(plan.step_id)
    assert waited == [False] * len(steps)
    assert prompt_graph_steps == [1, 3]  # the prompts' steps took the path that selects rows
