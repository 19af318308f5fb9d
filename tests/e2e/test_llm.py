"""The offline API: the user's vLLM example runs unchanged with `from cluster import ...`."""

import pytest

from cluster import LLM, SamplingParams


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
