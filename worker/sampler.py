"""Vectorized sampling over the batch: greedy, temperature, top-k and top-p.

Random draws use the exponential trick: argmax(p / q) with q ~ Exp(1) samples from p. A request
with a seed draws its q from its own generator, so its tokens do not depend on its batch.
"""

from dataclasses import dataclass

import torch

_GREEDY_EPS = 1e-5


@dataclass
class SamplingBatch:
    """Per-row parameters, on the logits' device."""

    temperatures: torch.Tensor  # [num_rows] float32; 0 = greedy
    top_ps: torch.Tensor  # [num_rows] float32; 1 = off
    top_ks: torch.Tensor  # [num_rows] int64; 0 = off
    generators: list[torch.Generator | None]  # per row; None = the shared generator


def sample(logits: torch.Tensor, batch: SamplingBatch, shared: torch.Generator) -> torch.Tensor:
    """logits [num_rows, vocab] float32 -> token ids [num_rows] int64."""
    greedy_ids = logits.argmax(dim=-1)
    greedy = batch.temperatures < _GREEDY_EPS
    if bool(greedy.all()):
        return greedy_ids
    temps = torch.where(greedy, torch.ones_like(batch.temperatures), batch.temperatures)
    logits = _mask_top_k_top_p(logits / temps[:, None], batch.top_ks, batch.top_ps)
    probs = torch.softmax(logits, dim=-1)
    noise = _exponential_noise(probs, batch.generators, shared)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, greedy_ids, sampled)


def _mask_top_k_top_p(
    logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor
) -> torch.Tensor:
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_rows, vocab]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_ks > 0, top_ks, torch.full_like(top_ks, vocab))
    drop = ranks >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_ps[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _exponential_noise(
    probs: torch.Tensor, generators: list[torch.Generator | None], shared: torch.Generator
) -> torch.Tensor:
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_(generator=shared)
    for row, gen in enumerate(generators):
        if gen is not None:
            noise[row].exponential_(generator=gen)
    return noise
