"""Scheduling through the whole cluster path on CPU: preemption (recompute and swap) under a KV
cache a third of the workload's size, prefix caching, chunked prefill and parallel sampling,
each checked against the tokens of an unconstrained or uncached run."""

import asyncio

import grpc
import pytest

from cluster.async_llm import AsyncLLM
from cluster.client import Client, make_request
from protos import serving_pb2_grpc
from scheduler.frontend.tokenizer import Tokenizer
from scheduler.sampling_params import SamplingParams

TIMEOUT = 600
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
SENTENCES = [
    "The river bends twice before it reaches the old mill at the edge of the village.",
    "Every morning the baker opens the shutters and sets out warm bread on the counter.",
    "Children walk past the square on their way to the school beside the chapel.",
    "In the afternoon the market fills with farmers selling apples, cheese and honey.",
    "A small train crosses the valley four times a day, whistling at the level crossing.",
    "At night the lamps along the harbour glow yellow and the fishing boats come home.",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return Tokenizer(smollm2_path)


def text_tokens(tokenizer, start: int, count: int) -> list[int]:
    """count tokens of prose, the sentences taken from `start` on (distinct starts differ)."""
    n = len(SENTENCES)
    text = " ".join(SENTENCES[(start + i) % n] for i in range(8 * n))
    tokens = tokenizer.encode(f"Story number {start}. {text}")
    assert len(tokens) >= count
    return tokens[:count]


def generate_all(address, prompts, params, salts=None):
    """Sends every prompt at once; returns, per prompt, {completion index: token ids}."""
    with grpc.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        calls = []
        for i, prompt in enumerate(prompts):
            msg = make_request(prompt, params)
            if salts is not None:
                msg.cache_salt = salts[i]
            calls.append(stub.Generate(msg, timeout=TIMEOUT))
        results = []
        for call in calls:
            tokens: dict[int, list[int]] = {}
            for delta in call:
                tokens.setdefault(delta.index, []).extend(delta.token_ids)
            results.append(tokens)
        return results


def replica_info(cluster):
    with Client(cluster.address) as client:
        return client.server_info().replicas[0]


def test_a_workload_three_times_the_cache_matches_an_unconstrained_run(
    small_cluster, local_cluster, tokenizer
):
    # 12 requests of 32 + 48 tokens: 5 blocks each, 60 blocks for a cache of 20. Short prompts
    # let many in at once; as they decode, they outgrow the cache.
    prompts = [text_tokens(tokenizer, i, 32) for i in range(12)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    before = replica_info(small_cluster)
    squeezed = generate_all(small_cluster.address, prompts, params)
    after = replica_info(small_cluster)
    assert squeezed == generate_all(local_cluster.address, prompts, params)
    assert all(len(out[0]) == 48 for out in squeezed)
    # Both kinds: a request caught in its prefill is recomputed; one that has computed more
    # than a step's budget (32 tokens) is swapped to host memory and back.
    preempted = after.num_preemptions - before.num_preemptions
    swapped = after.num_swapped_out - before.num_swapped_out
    assert preempted > swapped > 0
    assert after.num_free_blocks == after.num_blocks and after.num_running == 0
    assert after.num_free_cpu_blocks == after.num_cpu_blocks > 0


def test_requests_sharing_a_system_prompt_compute_it_once(local_cluster, tokenizer):
    system = text_tokens(tokenizer, 100, 256)  # 16 full blocks
    questions = [tokenizer.encode(f" Question {i}: what comes after {i}?") for i in range(16)]
    prompts = [system + q for q in questions]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    before = replica_info(local_cluster)
    cached = generate_all(local_cluster.address, prompts, params)
    after = replica_info(local_cluster)
    computed = after.num_prompt_tokens_computed - before.num_prompt_tokens_computed
    assert computed == 256 + sum(len(q) for q in questions)  # the prefix once, then suffixes
    assert after.prefix_cache_hits - before.prefix_cache_hits == 15 * 256
    # Every prompt again, each with its own cache salt: nothing shared, all computed (they fit
    # the cache together: no preemption).
    salts = [f"uncached-{i}" for i in range(len(prompts))]
    uncached = generate_all(local_cluster.address, prompts, params, salts)
    final = replica_info(local_cluster)
    assert final.num_preemptions == before.num_preemptions
    computed = final.num_prompt_tokens_computed - after.num_prompt_tokens_computed
    assert computed == sum(len(p) for p in prompts)
    assert uncached == cached


def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(
    small_cluster, local_cluster, tokenizer
):
    prompt = text_tokens(tokenizer, 200, 300)
    with Client(small_cluster.address) as client:
        chunked = [
            t
            for delta in client.generate(prompt, GREEDY, "long-prompt", TIMEOUT)
            for t in delta.token_ids
        ]
    records = small_cluster.step_records()
    steps = [r["scheduled"]["long-prompt"] for r in records if "long-prompt" in r["scheduled"]]
    assert sum(steps) == 300 + 15 and max(steps) <= 32  # 10 chunks of at most 32, 15 decodes
    (whole,) = generate_all(local_cluster.address, [prompt], GREEDY)
    assert chunked == whole[0]


def test_seeded_parallel_sampling_reproduces(local_cluster):
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=12, seed=7, n=4, ignore_eos=True)
    prompt = "Once upon a time"

    async def generate(p: SamplingParams):
        async with AsyncLLM(local_cluster.address) as engine:
            return await engine.complete(prompt, p)

    first = asyncio.run(generate(params))
    assert [o.index for o in first.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 12 and o.finish_reason == "length" for o in first.outputs)
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1  # sampled independently
    again = asyncio.run(generate(params))
    assert [o.token_ids for o in again.outputs] == [o.token_ids for o in first.outputs]
    # Completion i samples with seed + i: the same tokens as a single request with that seed,
    # although it shares the prompt's blocks with the others.
    for i, output in enumerate(first.outputs):
        single = SamplingParams(
            temperature=1.0, top_k=50, max_tokens=12, seed=7 + i, ignore_eos=True
        )
        assert asyncio.run(generate(single)).outputs[0].token_ids == output.token_ids


@pytest.mark.parametrize("n,message", [(257, "max_num_seqs=256"), (0, "n must be at least 1")])
def test_a_request_that_can_never_run_is_refused(local_cluster, n, message):
    msg = make_request("Hello", SamplingParams(max_tokens=2))
    msg.params.n = n
    with grpc.insecure_channel(local_cluster.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(serving_pb2_grpc.ServingStub(channel).Generate(msg, timeout=TIMEOUT))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
