"""Sampling parameters through the whole cluster path."""

from cluster.client import Client
from scheduler.sampling_params import SamplingParams

TIMEOUT = 300
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def _tokens(stream) -> list[int]:
    return [t for delta in stream for t in delta.token_ids]


def test_seeded_sampling_is_the_same_alone_and_batched_with_15_others(local_cluster):
    params = SamplingParams(
        temperature=0.9,
        top_p=0.9,
        top_k=40,
        min_p=0.02,
        presence_penalty=0.3,
        frequency_penalty=0.2,
        repetition_penalty=1.1,
        max_tokens=16,
        seed=7,
        ignore_eos=True,
    )
    with Client(local_cluster.address) as client:
        alone = _tokens(client.generate("Write a poem about the sea.", params, timeout=TIMEOUT))
        others = [
            client.generate(
                f"Tell me about topic {i}.",
                SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True),
                timeout=TIMEOUT,
            )
            for i in range(15)
        ]
        batched = client.generate("Write a poem about the sea.", params, timeout=TIMEOUT)
        together = _tokens(batched)
        for stream in others:
            _tokens(stream)
    assert together == alone


def test_min_tokens_holds_back_eos(local_cluster):
    with Client(local_cluster.address) as client:
        free = _tokens(
            client.generate(CHAT, SamplingParams(temperature=0, max_tokens=64), timeout=TIMEOUT)
        )
        held = _tokens(
            client.generate(
                CHAT,
                SamplingParams(temperature=0, max_tokens=64, min_tokens=len(free) + 5),
                timeout=TIMEOUT,
            )
        )
    assert free[-1] == 2 and len(free) < 64  # <|im_end|> ends the free answer
    assert 2 not in held[: len(free) + 5]
    assert held[: len(free) - 1] == free[:-1]


def test_repetition_penalty_changes_a_repetitive_greedy_answer(local_cluster):
    prompt = "one one one one one one one one"
    with Client(local_cluster.address) as client:
        plain = _tokens(
            client.generate(
                prompt,
                SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                timeout=TIMEOUT,
            )
        )
        penalized = _tokens(
            client.generate(
                prompt,
                SamplingParams(
                    temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=2.0
                ),
                timeout=TIMEOUT,
            )
        )
    assert plain != penalized
    assert len(set(penalized)) >= len(set(plain))
