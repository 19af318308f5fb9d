"""ModelRunner.warm_up: the prefill lengths that compile every tile height of the prefill kernel
run at start-up and leave nothing behind: the tokens of any later plans are those of a runner
that never warmed up (their KV entries, left in free blocks, are overwritten before read).
Eager steps' block tables are a multiple of 16 wide and the staged arrays 16-byte aligned, so
per-step values never select another compiled variant of a Triton kernel."""

import pytest

from worker.block_table import BlockTables
from worker.model_runner import WARM_UP_QUERY_LENS

from .test_launch_ahead import plans, random_prompts, runner_with_cache


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_warmed_up_runner_samples_what_a_fresh_one_does(tiny_llama_dir, device):
    path, _ = tiny_llama_dir
    prompts = random_prompts(["greedy-a", "greedy-b", "seeded-a", "penalized-a"], seed=2)
    steps = plans(prompts, steps=10, late="seeded-a", leaves="penalized-a")
    fresh = runner_with_cache(path, device)
    want = [fresh.execute(plan) for plan in steps]

    warmed = runner_with_cache(path, device)
    # max_model_len 64 over blocks of 4: 16 blocks a request, so lengths up to 64 fit.
    assert warmed.warm_up() == len([n for n in WARM_UP_QUERY_LENS if n <= 64])
    assert not warmed.requests and warmed.block_tables.lengths.sum() == 0
    got = [warmed.execute(plan) for plan in steps]
    for w, g in zip(want, got, strict=True):
        assert list(g.request_ids) == list(w.request_ids)
        assert list(g.token_ids) == list(w.token_ids)


def test_warm_up_runs_only_the_lengths_the_cache_holds(tiny_llama_dir):
    path, _ = tiny_llama_dir
    runner = runner_with_cache(path, "cpu", num_blocks=4)  # 16 tokens
    assert runner.warm_up() == len([n for n in WARM_UP_QUERY_LENS if n <= 16])


def test_an_eager_step_s_table_is_a_multiple_of_16_wide():
    tables = BlockTables(max_blocks=20)  # stored 32 wide: a full-length request fits
    assert tables.table.shape[1] == 32
    widths = {n: tables.step_width(n, block_size=16) for n in (1, 16, 17, 256, 257, 320)}
    assert widths == {1: 16, 16: 16, 17: 16, 256: 16, 257: 32, 320: 32}


@pytest.mark.gpu
def test_after_warm_up_mixed_steps_in_two_launches_compile_nothing(tiny_llama_dir, monkeypatch):
    """Steps of decodes beside a prompt (eager here: GRAPH_PREFILL_PAIRS 0), the prefill
    kernel's decodes in a launch of their own (SPLIT_CONTEXT 0 here: every such step splits):
    warm_up compiled each of those launches' variants, so the steps compile no new one."""
    from kernels import triton_prefill_attention
    from worker import model_runner

    monkeypatch.setattr(triton_prefill_attention, "SPLIT_CONTEXT", 0)
    monkeypatch.setattr(model_runner, "GRAPH_PREFILL_PAIRS", 0)  # no prompt in a whole graph

    def compiled() -> int:
        caches = triton_prefill_attention._prefill_kernel.device_caches.values()
        return sum(len(kernels) for kernels, *_ in caches)

    path, _ = tiny_llama_dir
    runner = runner_with_cache(path, "cuda")
    runner.warm_up()
    before = compiled()
    launched = []
    launch = triton_prefill_attention._launch
    monkeypatch.setattr(
        triton_prefill_attention, "_launch", lambda *a: launched.append(a[-1]) or launch(*a)
    )
    prompts = random_prompts(["greedy-a", "greedy-b", "greedy-c", "greedy-d"], seed=4)
    for plan in plans(prompts, steps=10, late="greedy-c", leaves="greedy-d"):
        runner.execute(plan)
    assert triton_prefill_attention.ONE_TOKEN in launched  # c's prompt beside decodes: split
    assert compiled() == before


def test_the_split_warm_up_attends_a_decode_and_each_prompt_length(tiny_llama_dir, monkeypatch):
    """_warm_up_split's batches (run on CUDA by warm_up) on the CPU's attention: a one-token
    sequence and an n-token one over the warm-up's blocks, each row of the output attended
    (finite), the launch split asked for (one_token_context past SPLIT_CONTEXT)."""
    from kernels.triton_prefill_attention import SPLIT_CONTEXT
    from worker.layers import attention

    path, _ = tiny_llama_dir
    runner = runner_with_cache(path, "cpu")
    runner.warm_up()
    seen = []
    paged_attention = attention.paged_attention

    def spy(*args, **kwargs):
        seen.append((kwargs["max_query_len"], kwargs["one_token_context"]))
        return paged_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "paged_attention", spy)
    out = runner._warm_up_split([2, 8, 40])
    assert seen == [(n, SPLIT_CONTEXT + 1) for n in (2, 8, 40)]
    layer = runner.model.attention_layers()[0]
    assert out.shape == (41, layer.num_heads, layer.head_dim) and bool(out.isfinite().all())
