"""Sampling against a direct torch computation of the distribution."""

import pytest
import torch

from worker.sampler import Penalties, SamplingBatch, apply_penalties, draw_seed, sample

VOCAB = 6
LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -1.0]])  # sorted descending


def _batch(n, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seeds=None, **extra):
    return SamplingBatch(
        temperatures=torch.full((n,), temperature),
        top_ps=torch.full((n,), top_p),
        top_ks=torch.full((n,), top_k, dtype=torch.int64),
        min_ps=torch.full((n,), min_p),
        seeds=seeds or [None] * n,
        **extra,
    )


def _histogram(logits, draws=4000, **kwargs):
    gen = torch.Generator().manual_seed(0)
    rows = logits.expand(draws, -1).contiguous()
    extra = {k: v for k, v in kwargs.items() if k in ("suppressed", "penalties")}
    if "suppressed" in extra:
        extra["suppressed"] = extra["suppressed"].expand(draws, -1)
    params = {k: v for k, v in kwargs.items() if k not in extra}
    tokens = sample(rows, _batch(draws, **params, **extra), gen).token_ids
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The target distribution, computed step by step over the sorted logits."""
    probs = torch.softmax(logits[0] / temperature, -1)
    keep = torch.ones(VOCAB, dtype=torch.bool)
    keep &= probs >= min_p * probs.max()
    if top_k:
        keep[top_k:] = False
    p = torch.where(keep, probs, 0)
    p = p / p.sum()
    keep &= (p.cumsum(-1) - p) < top_p
    out = torch.where(keep, probs, 0)
    return out / out.sum(), keep


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(1))
    out = sample(logits, _batch(5, temperature=0.0), torch.Generator()).token_ids
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.7},
        {"top_k": 3},
        {"top_p": 0.8},
        {"top_k": 4, "top_p": 0.9},
        {"min_p": 0.3},
        {"temperature": 1.5, "min_p": 0.1, "top_p": 0.95},
    ],
)
def test_sampling_follows_the_distribution(kwargs):
    expected, keep = _expected(LOGITS, **kwargs)
    got = _histogram(LOGITS, **kwargs)
    assert torch.all(got[~keep] == 0), kwargs
    torch.testing.assert_close(got, expected, atol=0.03, rtol=0)


def test_penalties_match_their_definition():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    prompt = torch.tensor([[False, False, False, True], [True, False, False, False]])
    p = Penalties(
        presence=torch.tensor([0.5, 0.0]),
        frequency=torch.tensor([0.25, 0.1]),
        repetition=torch.tensor([2.0, 1.5]),
        output_counts=counts,
        prompt_mask=prompt,
    )
    got = apply_penalties(logits, p)
    expected = torch.tensor(
        [
            [2.0 / 2 - 0.25 * 2 - 0.5, -1.0 * 2 - 0.25 - 0.5, 0.5, 3.0 / 2],
            [1.0 / 1.5, 1.0, 1.0 / 1.5 - 0.1 * 3, 1.0],
        ]
    )
    torch.testing.assert_close(got, expected)


def test_min_tokens_suppression_and_penalized_greedy():
    suppressed = torch.tensor([[True, False, False, False, False, False]])
    got = _histogram(LOGITS, suppressed=suppressed, temperature=0.0)
    assert got[0] == 0 and got[1] == 1.0


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(3))
    out = sample(logits, _batch(3, temperature=0.0, num_logprobs=4), torch.Generator())
    expected = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.top_logprobs, expected.topk(4, -1).values)
    assert torch.equal(out.top_ids, expected.topk(4, -1).indices)
    torch.testing.assert_close(out.sampled_logprobs, expected.max(-1).values)


def test_seeded_rows_do_not_depend_on_the_batch():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(2))

    seed = draw_seed(1234, 0)
    alone = sample(logits[:1], _batch(1, seeds=[seed]), torch.Generator()).token_ids
    batched = sample(
        logits, _batch(4, seeds=[seed, None, None, None]), torch.Generator().manual_seed(9)
    ).token_ids
    assert alone[0] == batched[0]


def test_a_seeded_request_draws_anew_for_each_output_token():
    """Each output index seeds its own draw: the same distribution gives varied tokens across
    indices (a draw seeded by the seed alone would repeat one token), and the same token again
    for the same (seed, index)."""
    uniform = torch.zeros(1, 1000)
    tokens = [
        int(sample(uniform, _batch(1, seeds=[draw_seed(7, i)]), torch.Generator()).token_ids[0])
        for i in range(8)
    ]
    assert len(set(tokens)) == 8
    again = sample(uniform, _batch(1, seeds=[draw_seed(7, 3)]), torch.Generator()).token_ids
    assert int(again[0]) == tokens[3]


def test_without_top_k_or_top_p_the_vocab_is_not_sorted_and_the_draws_are_the_same(monkeypatch):
    import worker.sampler

    rows = LOGITS.expand(4000, -1).contiguous()
    masked = sample(rows, _batch(4000, temperature=0.7), torch.Generator().manual_seed(0))
    plain = SamplingBatch(temperatures=torch.full((4000,), 0.7), seeds=[None] * 4000)

    def no_sort(*args):
        raise AssertionError("the top-k / top-p mask ran for a batch that uses neither")

    monkeypatch.setattr(worker.sampler, "_mask_top_k_top_p", no_sort)
    unmasked = sample(rows, plain, torch.Generator().manual_seed(0))
    assert torch.equal(masked.token_ids, unmasked.token_ids)


def _sorted_top_k_top_p(logits, top_ks, top_ps):
    """The definition, over the whole sorted vocabulary."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab)[None, :]
    k = torch.where(top_ks > 0, top_ks, torch.full_like(top_ks, vocab))
    sorted_logits = sorted_logits.masked_fill(ranks >= k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_ps[:, None]) & (top_ps < 1)[:, None]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_top_k_top_p_keep_the_sorted_definitions_set_without_sorting_the_vocab(device):
    """The kept sets come from the top 64 or 1024 candidates when these hold them (every
    top_k's), else on the CPU from more candidates up to the whole vocabulary and on CUDA from
    each unsettled row's top-p floor (the Triton kernels.top_p_floor): rows peaked (a few
    tokens), spread (hundreds) and flat (most of it)."""
    from worker.sampler import _mask_top_k_top_p

    gen = torch.Generator().manual_seed(5)
    vocab = 5000
    rows = [  # (logit scale, top_k, top_p)
        (6.0, 0, 0.95),
        (2.0, 0, 0.95),
        (0.1, 0, 0.95),
        (2.0, 50, 0.9),
        (2.0, 2000, 1.0),
        (0.1, 3000, 0.5),
        (2.0, 10, 1.0),
        (2.0, 0, 1.0),
        (0.5, 0, 0.3),
    ]
    for subset in (rows, rows[:2], rows[:3], [rows[4]], [rows[7]]):
        logits = torch.stack([torch.randn(vocab, generator=gen) * s for s, _, _ in subset])
        top_ks = torch.tensor([k for _, k, _ in subset])
        top_ps = torch.tensor([p for _, _, p in subset])
        got = _mask_top_k_top_p(
            logits.to(device), top_ks.to(device), top_ps.to(device), int(top_ks.max())
        ).cpu()
        expected = _sorted_top_k_top_p(logits, top_ks, top_ps)
        assert torch.equal(got.isfinite(), expected.isfinite())
        assert torch.equal(got[got.isfinite()], logits[got.isfinite()])
