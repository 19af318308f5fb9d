"""SamplingRows.batch's penalty and min_tokens tensors, built on the device from the rows'
tokens: each penalized row's output counts and prompt mask are those its own tokens give, for
rows of different lengths, after prompts and several decode steps; the unpenalized rows beside
them stay empty, and their penalties leave their logits as they are; the suppressed tokens are
the banned ones of the rows short of min_tokens (CPU and CUDA). Each row's parameters are its
request's options."""

import numpy as np
import pytest
import torch

from worker.sampler import apply_penalties

from .test_launch_ahead import plans, random_prompts, runner_with_cache


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
    batch = runner.sampling.batch(rows, runner.rows, vocab, runner._sampled, torch.device(device))
    penalties = batch.penalties
    assert penalties is not None
    for i, (name, state) in enumerate(zip(names, states, strict=True)):
        history = runner.rows.history(state.row)
        prompt_len = len(prompts[name])
        assert state.sampling.prompt_len == prompt_len
        outputs = history[prompt_len:]
        assert len(outputs) == (3 if name == "penalized-b" else 5)  # it came at step 3
        want_counts = np.bincount(outputs, minlength=vocab).astype(np.float32)
        want_mask = np.bincount(history[:prompt_len], minlength=vocab) > 0
        if not name.startswith("penalized"):
            want_counts, want_mask = np.zeros_like(want_counts), np.zeros_like(want_mask)
        assert np.array_equal(penalties.output_counts[i].cpu().numpy(), want_counts), name
        assert np.array_equal(penalties.prompt_mask[i].cpu().numpy(), want_mask), name
        opts = state.sampling
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
