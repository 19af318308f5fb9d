"""The offline API: the user's vLLM example runs unchanged with `from cluster import ...`;
LLM.generate inside a running event loop, AsyncLLM streaming, the progress bar."""

import asyncio
import time
from itertools import pairwise

import grpc
import pytest

from cluster import LLM, AsyncLLM, SamplingParams
from cluster.client import Client

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(local_cluster):  # shares the session's Ray; starts its own actors
    engine = LLM(model="smollm2-135m-instruct", gpu_memory_utilization=0.9, cpu_cache_gb=0.5)
    yield engine
    engine.shutdown()


def test_the_vllm_example_runs_unchanged(llm):
    prompts = ["Hello, my name is", "The capital of France is", "The future of AI is"]
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=0)
    outputs = llm.generate(prompts, sampling_params)
    assert [o.prompt for o in outputs] == prompts
    for output in outputs:
        assert output.outputs[0].text
        assert 1 <= len(output.outputs[0].token_ids) <= 16


def test_token_id_prompts_and_input_order(llm, local_cluster):
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    texts = ["The capital of France is", "One, two, three,"]
    by_text = llm.generate(texts, greedy)
    by_ids = llm.generate([{"prompt_token_ids": o.prompt_token_ids} for o in by_text], greedy)
    assert [o.outputs[0].token_ids for o in by_ids] == [o.outputs[0].token_ids for o in by_text]
    assert all(o.prompt is None for o in by_ids)
    single = llm.generate("One, two, three,", greedy)
    assert single[0].outputs[0].token_ids == by_text[1].outputs[0].token_ids


def test_seeded_sampling_reproduces(llm):
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=12, seed=42, ignore_eos=True)
    first = llm.generate(["Once upon a time"], params)[0].outputs[0].token_ids
    batch = llm.generate(["Once upon a time", "Hello there", "Numbers: 1, 2,"], params)
    assert batch[0].outputs[0].token_ids == first


def test_logprobs_and_stop_reason_reach_the_outputs(llm):
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True)
    out = llm.generate("The capital of France is", params)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    assert [next(iter(p)) for p in out.logprobs] == out.token_ids  # the sampled token first
    pairs = list(zip(out.logprobs, out.token_ids, strict=True))
    assert all(len(p) == 2 and p[t].rank == 1 for p, t in pairs)  # greedy: the top token
    total = sum(p[t].logprob for p, t in pairs)
    assert out.cumulative_logprob == pytest.approx(total, abs=1e-4)
    stop = out.token_ids[2]
    params = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=[stop], ignore_eos=True)
    stopped = llm.generate("The capital of France is", params)[0].outputs[0]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop)
    assert stopped.token_ids == out.token_ids[: out.token_ids.index(stop) + 1]
    assert stopped.logprobs is None and stopped.cumulative_logprob is None


def test_generate_inside_a_running_event_loop(llm):
    """As in a Jupyter cell: the caller's thread runs a loop of its own."""
    outside = llm.generate("The capital of France is", GREEDY, use_tqdm=False)

    async def cell():
        return llm.generate("The capital of France is", GREEDY, use_tqdm=False)

    inside = asyncio.run(cell())
    assert inside[0].outputs[0].token_ids == outside[0].outputs[0].token_ids
    assert len(inside[0].outputs[0].token_ids) == 8


def test_async_llm_streams_cumulative_outputs(llm):
    expected = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0]

    async def stream():
        async with AsyncLLM(llm.address) as engine:
            return [out async for out in engine.generate("The capital of France is", GREEDY)]

    outs = asyncio.run(stream())
    assert len(outs) > 1  # streamed, not one message at the end
    tokens = [out.outputs[0].token_ids for out in outs]
    assert all(a == b[: len(a)] and len(a) < len(b) for a, b in pairwise(tokens))
    assert [out.finished for out in outs] == [False] * (len(outs) - 1) + [True]
    last = outs[-1]
    assert last.outputs[0].token_ids == expected.outputs[0].token_ids
    assert last.outputs[0].text == expected.outputs[0].text
    assert last.prompt_token_ids == expected.prompt_token_ids
    assert last.outputs[0].usage.completion_tokens == 8


def test_chat_offline_and_streamed_answers_alike(llm):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0.0, max_tokens=16)
    (offline,) = llm.chat(question, params, use_tqdm=False)
    assert "Paris" in offline.outputs[0].text
    assert offline.prompt is None and offline.prompt_token_ids  # rendered by the server

    async def stream():
        async with AsyncLLM(llm.address) as engine:
            return [out async for out in engine.chat(question, params)]

    streamed = asyncio.run(stream())
    assert streamed[-1].finished
    assert streamed[-1].outputs[0].token_ids == offline.outputs[0].token_ids
    assert streamed[-1].prompt_token_ids == offline.prompt_token_ids


def test_async_llm_aborts_by_request_id(llm):
    long = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)

    async def abort_after_the_first_output():
        async with AsyncLLM(llm.address) as engine:
            outs = []
            async for out in engine.generate("Count to a thousand", long, "to-abort"):
                if not outs:
                    assert await engine.abort("to-abort")
                outs.append(out)
            return outs, await engine.abort("to-abort")

    outs, found_again = asyncio.run(abort_after_the_first_output())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 2000
    assert not found_again


def test_a_failed_prompt_stops_the_others(llm):
    """The LLM's loop outlives generate: the requests still running when one fails go too."""
    long = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    bad = {"prompt_token_ids": [10**6]}  # outside the vocabulary
    with pytest.raises(grpc.RpcError) as failed:
        llm.generate(["Count to a thousand", "Once upon a time", bad], long, use_tqdm=False)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    deadline = time.monotonic() + 60  # 4000 tokens take minutes on a CPU
    with Client(llm.address) as client:
        while busy := sum(r.num_running + r.num_waiting for r in client.server_info().replicas):
            assert time.monotonic() < deadline, f"{busy} requests still run"
            time.sleep(0.1)


def test_the_progress_bar_counts_prompts_on_stderr_unless_turned_off(llm, capsys):
    prompts = ["Hello, my name is", "The capital of France is", "One, two, three,"]
    llm.generate(prompts, GREEDY)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err
    speed = err[err.rindex("output: ") :]
    assert float(speed.split()[1]) > 0  # output tokens per second
    llm.generate(prompts, GREEDY, use_tqdm=False)
    assert "Processed prompts" not in capsys.readouterr().err


def test_a_cpu_worker_computes_on_the_cores_of_its_node(llm):
    import os

    import ray
    import torch

    from worker.threads import available_cores

    if torch.cuda.is_available():
        pytest.skip("the workers run on GPUs")
    # Not the one thread of Ray's OMP_NUM_THREADS for the sliver of a CPU a CPU worker reserves.
    expected = int(os.environ.get("OMP_NUM_THREADS") or available_cores())
    workers = llm._cluster.workers()
    assert ray.get([w.torch_threads.remote() for w in workers]) == [expected] * len(workers)
