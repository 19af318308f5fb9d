"""SamplingRows.batch's penalty and min_tokens tensors, built on the device from the rows'
tokens: each penalized row's output counts and prompt mask are those its own tokens give, for
rows of different lengths, after prompts and several decode steps; the unpenalized rows beside
them stay empty, and their penalties leave their logits as they are; the suppressed tokens are
the banned ones of the rows short of min_tokens (CPU and CUDA). Each row's parameters are its
request's options."""

import numpy as np
import pytest
import torch

from protos import worker_pb2
from worker.sampler import apply_penalties

from .test_launch_ahead import BLOCK, SAMPLING, plans, random_prompts, runner_with_cache


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_penalty_and_min_tokens_tensors_are_each_row_s_own(tiny_llama_dir, device):
    path, _ = tiny_llama_dir
    names = ["penalized-a", "greedy-a", "penalized-b", "min_tokens-a"]
    prompts = random_prompts(names, seed=6)
    runner = runner_with_cache(path, device)
    for plan in plans(prompts, steps=5, late="penalized-b", leaves="none"):
        for new in plan.new_requests:  # as the scheduler sends them: where the outputs start
            new.sampling.prompt_len = len(new.token_ids)
        runner.execute(plan)
    states = [runner.requests[name] for name in names]
    rows = np.array([s.row for s in states])
    vocab = 256
    batch = runner.sampling.batch(rows, runner.rows, vocab, torch.device(device))
    penalties = batch.penalties
    assert penalties is not None
    for i, (name, state) in enumerate(zip(names, states, strict=True)):
        history = runner.rows.history(state.row)
        prompt_len = len(prompts[name])
        assert runner.sampling.prompt_len[state.row] == prompt_len
        outputs = history[prompt_len:]
        assert len(outputs) == (3 if name == "penalized-b" else 5)  # it came at step 3
        want_counts = np.bincount(outputs, minlength=vocab).astype(np.float32)
        want_mask = np.bincount(history[:prompt_len], minlength=vocab) > 0
        if not name.startswith("penalized"):
            want_counts, want_mask = np.zeros_like(want_counts), np.zeros_like(want_mask)
        assert np.array_equal(penalties.output_counts[i].cpu().numpy(), want_counts), name
        assert np.array_equal(penalties.prompt_mask[i].cpu().numpy(), want_mask), name
        opts = SAMPLING[name.split("-")[0]]
        assert batch.temperatures[i].item() == pytest.approx(opts.temperature)
        assert penalties.presence[i].item() == pytest.approx(opts.presence_penalty)
        assert penalties.frequency[i].item() == pytest.approx(opts.frequency_penalty)
        assert penalties.repetition[i].item() == pytest.approx(opts.repetition_penalty or 1.0)
    logits = torch.randn(len(names), vocab, device=device)
    unchanged = apply_penalties(logits, penalties) == logits  # [rows, vocab]
    assert [bool(unchanged[i].all()) for i in range(len(names))] == [
        not name.startswith("penalized") for name in names
    ]
    # min_tokens-a (6, tokens 1-3 banned) has 5 outputs: still banned; no other row is.
    want_suppressed = np.zeros((len(names), vocab), dtype=bool)
    want_suppressed[names.index("min_tokens-a"), [1, 2, 3]] = True
    assert np.array_equal(batch.suppressed.cpu().numpy(), want_suppressed)


def _counts_are_the_rows_own(runner, names: list[str], vocab: int, device: str) -> None:
    states = [runner.requests[name] for name in names]
    rows = np.array([s.row for s in states])
    penalties = runner.sampling.batch(rows, runner.rows, vocab, torch.device(device)).penalties
    for i, state in enumerate(states):
        history = runner.rows.history(state.row)
        prompt_len = runner.sampling.prompt_len[state.row]
        want_counts = np.bincount(history[prompt_len:], minlength=vocab).astype(np.float32)
        want_mask = np.bincount(history[:prompt_len], minlength=vocab) > 0
        assert np.array_equal(penalties.output_counts[i].cpu().numpy(), want_counts), i
        assert np.array_equal(penalties.prompt_mask[i].cpu().numpy(), want_mask), i


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_penalty_slots_grow_and_are_reused_empty(tiny_llama_dir, device):
    """Eight penalized requests take more slots than the first tensors hold (grown, the
    earlier slots' counts kept); four leave and four others take their rows and slots, two
    of them resumed after a preemption (outputs in their NewRequest): each row counts its own
    tokens only, nothing of the requests before it."""
    path, _ = tiny_llama_dir
    names = [f"penalized-{i}" for i in range(8)]
    prompts = random_prompts(names, seed=8)
    runner = runner_with_cache(path, device)
    for plan in plans(prompts, steps=3, late="none", leaves="none"):
        for new in plan.new_requests:
            new.sampling.prompt_len = len(new.token_ids)
        runner.execute(plan)
    vocab = 256
    _counts_are_the_rows_own(runner, names, vocab, device)
    assert len(runner.sampling.counts) > 8  # grown past its first 8 slots (one kept empty)
    gone, kept = names[:4], names[4:]
    plan = worker_pb2.StepPlan(step_id=4, finished_request_ids=gone)
    gen = torch.Generator().manual_seed(9)
    comers = []
    for i in range(4):
        prompt = torch.randint(4, 250, (6,), generator=gen).tolist()
        outputs = torch.randint(4, 250, (3 * (i % 2),), generator=gen).tolist()
        sampling = worker_pb2.SamplingOptions()
        sampling.CopyFrom(SAMPLING["penalized"])
        sampling.prompt_len = len(prompt)
        tokens = prompt + outputs
        comers.append(f"penalized-new{i}")
        plan.new_requests.append(
            worker_pb2.NewRequest(
                request_id=comers[-1],
                token_ids=tokens,
                sampling=sampling,
                block_ids=list(range(200 + 4 * i, 200 + 4 * i + -(-len(tokens) // BLOCK))),
                num_scheduled_tokens=len(tokens),
            )
        )
    runner.execute(plan)
    assert {runner.requests[n].row for n in comers} == {i for i in range(4)}  # the rows freed
    _counts_are_the_rows_own(runner, kept + comers, vocab, device)


def test_the_profile_batch_turns_every_option_on(tiny_llama_dir):
    """ProfileMemory's sampler pass: every optional tensor present at the step's sizes, the
    penalty slots of as many penalized rows reserved beside the empty one, and the sampler
    runs it (CPU)."""
    path, _ = tiny_llama_dir
    runner = runner_with_cache(path, "cpu")
    vocab = runner.model.vocab_size
    batch = runner.sampling.profile_batch(6, vocab, torch.device("cpu"))
    p = batch.penalties
    assert not batch.all_greedy and batch.num_logprobs >= 0
    for rows in (batch.temperatures, batch.top_ps, batch.top_ks, batch.min_ps, p.presence):
        assert rows.shape == (6,)
    for table in (p.output_counts, p.prompt_mask, batch.suppressed):
        assert table.shape == (6, vocab)
    assert len(runner.sampling.free_slots) >= 6 and len(runner.sampling.counts) >= 7
    runner.profile_sampler(6)


@pytest.mark.gpu
def test_the_memory_profile_holds_a_full_steps_sampling(tiny_llama_dir):
    """ProfileMemory's peak grows with the rows a step may sample: at least one [rows, vocab]
    float32 tensor more at 4096 rows than at none (the sampler holds several)."""
    from worker.worker import WorkerService

    path, _ = tiny_llama_dir
    runner = runner_with_cache(path, "cuda")
    vocab = runner.model.vocab_size
    alone = WorkerService._profile_cuda_peak(runner, BLOCK, 64, 0)
    sampling = WorkerService._profile_cuda_peak(runner, BLOCK, 64, 4096)
    assert sampling - alone >= 4096 * vocab * 4
