"""Sampling against a direct torch computation of the distribution."""

import torch

from worker.sampler import SamplingBatch, sample


def _batch(n, temperature=1.0, top_p=1.0, top_k=0, generators=None):
    return SamplingBatch(
        temperatures=torch.full((n,), temperature),
        top_ps=torch.full((n,), top_p),
        top_ks=torch.full((n,), top_k, dtype=torch.int64),
        generators=generators or [None] * n,
    )


def _histogram(logits, batch_kwargs, draws=4000):
    gen = torch.Generator().manual_seed(0)
    rows = logits.expand(draws, -1).contiguous()
    tokens = sample(rows, _batch(draws, **batch_kwargs), gen)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    out = sample(logits, _batch(5, temperature=0.0), torch.Generator())
    assert torch.equal(out, logits.argmax(-1))


def test_temperature_top_k_top_p_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])
    for kwargs in ({"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.8}, {"top_k": 4, "top_p": 0.9}):
        t = kwargs.get("temperature", 1.0)
        probs = torch.softmax(logits[0] / t, -1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if kwargs.get("top_k"):
            keep[kwargs["top_k"] :] = False  # logits are sorted descending
        p = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum()
        if "top_p" in kwargs:
            before = p.cumsum(-1) - p
            keep &= before < kwargs["top_p"]
        expected = torch.where(keep, probs, 0)
        expected /= expected.sum()
        got = _histogram(logits, kwargs)
        assert torch.all(got[~keep] == 0), kwargs
        torch.testing.assert_close(got, expected, atol=0.03, rtol=0)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))

    def seeded():
        return torch.Generator().manual_seed(1234)

    alone = sample(logits[:1], _batch(1, generators=[seeded()]), torch.Generator())
    batched = sample(
        logits, _batch(4, generators=[seeded(), None, None, None]), torch.Generator().manual_seed(9)
    )
    assert alone[0] == batched[0]
