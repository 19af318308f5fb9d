"""Vectorized sampling over the batch, vLLM's semantics, on the logits' device.

Order: min_tokens suppression -> repetition / frequency / presence penalties -> greedy rows take
the argmax -> temperature -> min-p -> top-k -> top-p -> draw. Logprobs describe the model's raw
distribution (log-softmax of the logits before any of these steps).

Random draws use the exponential trick: argmax(p / q) with q ~ Exp(1) samples from p. A request
with a seed draws the q of its i-th output token from a generator seeded with draw_seed(seed, i),
so its tokens depend neither on its batch nor on the worker's history: a request recomputed after
a preemption or on another replica (its outputs so far sent again) resumes at the right draw.
"""

from dataclasses import dataclass

import torch

from kernels import top_p_floor

GREEDY_EPS = 1e-5


@dataclass
class Penalties:
    """Only built when some row asks for a penalty (otherwise the batch skips this work)."""

    presence: torch.Tensor  # [num_rows] float32; 0 = off
    frequency: torch.Tensor  # [num_rows] float32; 0 = off
    repetition: torch.Tensor  # [num_rows] float32; 1 = off
    output_counts: torch.Tensor  # [num_rows, vocab] float32: occurrences in the output so far
    prompt_mask: torch.Tensor  # [num_rows, vocab] bool: tokens present in the prompt


@dataclass
class SamplingBatch:
    """Per-row parameters, on the logits' device."""

    temperatures: torch.Tensor  # [num_rows] float32; 0 = greedy
    seeds: list[int | None]  # per row: its draw's seed (draw_seed); None = the shared generator
    # Every row greedy, known on the host: argmax alone, with no device sync to find out.
    all_greedy: bool = False
    # top_ps and top_ks come together, or neither when no row uses them (no sort of the vocab).
    top_ps: torch.Tensor | None = None  # [num_rows] float32; 1 = off
    top_ks: torch.Tensor | None = None  # [num_rows] int64; 0 = off
    max_top_k: int = 0  # the largest of top_ks, known on the host (the candidates to take)
    min_ps: torch.Tensor | None = None  # [num_rows] float32; 0 = off
    penalties: Penalties | None = None
    suppressed: torch.Tensor | None = None  # [num_rows, vocab] bool: banned now (min_tokens)
    num_logprobs: int = -1  # top logprobs to return per row; -1 = none


@dataclass
class SampleOutput:
    token_ids: torch.Tensor  # [num_rows] int64
    # When logprobs were asked: the sampled token's logprob and rank (1 = most likely)
    # [num_rows], and the top num_logprobs ids and logprobs [num_rows, num_logprobs].
    sampled_logprobs: torch.Tensor | None = None
    sampled_ranks: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


_MASK_64 = (1 << 64) - 1


def draw_seed(seed: int, output_index: int) -> int:
    """The generator seed of a seeded request's draw of output token `output_index` (a 64-bit
    mix of both, SplitMix64's finalizer, so that neighbouring seeds and indices do not give
    correlated streams)."""
    z = (seed + (output_index + 1) * 0x9E3779B97F4A7C15) & _MASK_64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return z ^ (z >> 31)


def sample(logits: torch.Tensor, batch: SamplingBatch, shared: torch.Generator) -> SampleOutput:
    """logits [num_rows, vocab] float32 -> the sampled tokens (and their logprobs)."""
    raw = logits
    if batch.suppressed is not None:
        logits = logits.masked_fill(batch.suppressed, float("-inf"))
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    tokens = _choose(logits, batch, shared)
    if batch.num_logprobs < 0:
        return SampleOutput(tokens)
    logprobs = torch.log_softmax(raw, dim=-1)  # [num_rows, vocab]
    top_lp, top_ids = logprobs.topk(batch.num_logprobs, dim=-1)
    sampled_lp = logprobs.gather(-1, tokens[:, None])  # [num_rows, 1]
    ranks = (logprobs > sampled_lp).sum(dim=-1) + 1
    return SampleOutput(tokens, sampled_lp.squeeze(-1), ranks, top_ids, top_lp)


def apply_penalties(logits: torch.Tensor, p: Penalties) -> torch.Tensor:
    """Repetition (prompt and output tokens: positive logits / r, negative * r), then
    frequency (- f * count) and presence (- p * seen) over the output tokens, as vLLM does."""
    seen_output = p.output_counts > 0
    seen = seen_output | p.prompt_mask
    rep = p.repetition[:, None].expand_as(logits)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    logits = logits - p.frequency[:, None] * p.output_counts
    return logits - p.presence[:, None] * seen_output.float()


def _choose(logits: torch.Tensor, batch: SamplingBatch, shared: torch.Generator) -> torch.Tensor:
    greedy_ids = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_ids
    greedy = batch.temperatures < GREEDY_EPS
    temps = torch.where(greedy, torch.ones_like(batch.temperatures), batch.temperatures)
    logits = logits / temps[:, None]
    if batch.min_ps is not None:
        logits = _mask_min_p(logits, batch.min_ps)
    if batch.top_ks is not None and batch.top_ps is not None:
        logits = _mask_top_k_top_p(logits, batch.top_ks, batch.top_ps, batch.max_top_k)
    probs = torch.softmax(logits, dim=-1)
    noise = _exponential_noise(probs, batch.seeds, shared)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, greedy_ids, sampled)


def _mask_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below min_p times the top token's."""
    probs = torch.softmax(logits, dim=-1)
    floor = min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < floor, float("-inf"))


# Top-k / top-p look at the highest logits of each row first (a partial selection, no sort of
# the vocabulary): the first of these counts at or above every row's top_k (the host knows
# the top_ks), else the whole vocabulary; on the CPU the next count while rows are unsettled.
_TOP_CANDIDATES = (64, 1024)


def _mask_top_k_top_p(
    logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor, max_top_k: int
) -> torch.Tensor:
    """-inf outside each row's kept set: its top k tokens (top_k 0: all), then of these, in
    descending order, those whose probability mass before them (renormalized over the top k)
    is below top_p (the top token always stays; top_p 1: all). A row with neither keeps
    every token. max_top_k: the rows' largest top_k (0: none), from the host.

    The candidates (the top logits, as many as every top_k needs) settle every row with a
    top_k, and every row whose candidates reach top_p. On the CPU the rest take more
    candidates, up to the whole vocabulary. On CUDA, where asking whether any row is left
    would wait for the device, they keep every logit at or above their top-p floor
    (kernels.top_p_floor), found on the device in the same launch sequence."""
    vocab = logits.shape[-1]
    counts = [n for n in _TOP_CANDIDATES if max_top_k <= n < vocab] + [vocab]
    k = torch.where((top_ks > 0) & (top_ks < vocab), top_ks, torch.full_like(top_ks, vocab))
    no_top_k, top_p_on = k >= vocab, top_ps < 1
    peak = logits.max(dim=-1, keepdim=True).values
    row_total = torch.exp(logits - peak).sum(dim=-1)  # normalizes a row without top-k
    for num in counts:
        values, order = logits.topk(num, dim=-1)  # [num_rows, num], descending
        ranks = torch.arange(num, device=logits.device)[None, :]
        values = values.masked_fill(ranks >= k[:, None], float("-inf"))
        exp = torch.exp(values - peak)
        probs = exp / torch.where(no_top_k, row_total, exp.sum(dim=-1))[:, None]
        cumulative = probs.cumsum(dim=-1)
        drop = (cumulative - probs >= top_ps[:, None]) & top_p_on[:, None]
        drop[:, 0] = False
        # Unsettled: no top-k (num covers every top_k) and the candidates' mass below top_p.
        unsettled = no_top_k & top_p_on & (cumulative[:, -1] < top_ps)
        if num == vocab or logits.is_cuda or not bool(unsettled.any()):
            break
    kept = values.masked_fill(drop, float("-inf"))
    masked = torch.full_like(logits, float("-inf")).scatter_(-1, order, kept)
    if logits.is_cuda and num < vocab:  # the unsettled rows by their floor
        floor = top_p_floor(logits, peak.squeeze(-1), row_total, top_ps, unsettled)
        beyond = logits.masked_fill(logits < floor[:, None], float("-inf"))
        masked = torch.where(unsettled[:, None], beyond, masked)
    return torch.where((no_top_k & ~top_p_on)[:, None], logits, masked)


def _exponential_noise(
    probs: torch.Tensor, seeds: list[int | None], shared: torch.Generator
) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if any(seed is None for seed in seeds):
        noise.exponential_(generator=shared)
    for row, seed in enumerate(seeds):
        if seed is not None:
            gen = torch.Generator(device=probs.device).manual_seed(seed)
            noise[row].exponential_(generator=gen)
    return noise
