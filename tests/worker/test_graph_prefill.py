"""Short prefill chunks replay the decode graphs, one row a token (GRAPH_PREFILL_PAIRS).

On the CPU the graphs' forward pass runs eagerly where a replay would be (EagerGraphs), so the
runner's side of it (a row for every token, its position, slot and its request's block table;
the samplers' rows picked out; a chunk's tokens attending to those the same step wrote before
them) is checked against the eager runner in float32: the same tokens each step, greedy, seeded
and penalized, with late arrivals and chunked prompts. On a GPU the captured graphs do the same
(tests/worker/test_cuda_graph.py: prefills within a graph's size replay it)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from protos import worker_pb2
from tests.conftest import free_port
from worker import distributed, model_runner
from worker.cuda_graph import DecodeGraphs
from worker.model_runner import ModelRunner
from worker.worker import WorkerService

from .conftest import greedy_plan_runner
from .test_launch_ahead import plans, random_prompts, runner_with_cache

MAX_GRAPH_ROWS = 16


class _Replay:
    """Stands for a captured graph of `size` rows: running it runs what would be captured."""

    def __init__(self, graphs: DecodeGraphs, size: int) -> None:
        self.graphs, self.size = graphs, size

    @torch.inference_mode()
    def replay(self) -> None:
        self.graphs._forward(self.size)


class EagerGraphs(DecodeGraphs):
    def capture(self) -> None:
        self.graphs = {size: _Replay(self, size) for size in self.sizes}


def graphed_runner(path) -> ModelRunner:
    runner = runner_with_cache(path, "cpu")
    runner.graphs = EagerGraphs(
        runner.model, MAX_GRAPH_ROWS, runner.block_tables.max_blocks, runner.device
    )
    runner.graphs.capture()
    return runner


def _tokens(result: worker_pb2.StepResult) -> tuple[list[str], list[int]]:
    return list(result.request_ids), list(result.token_ids)


def test_prefills_through_the_graphs_sample_what_eager_steps_do(tiny_llama_dir):
    path, _ = tiny_llama_dir
    names = ["greedy-a", "greedy-b", "seeded-a", "penalized-a", "min_tokens-a"]
    prompts = random_prompts(names, seed=3)  # 3 to 10 tokens each
    steps = plans(prompts, steps=10, late="seeded-a", leaves="penalized-a")
    eager = runner_with_cache(path, "cpu")
    graphed = graphed_runner(path)
    want = [eager.execute(plan) for plan in steps]
    got = [graphed.execute(plan) for plan in steps]
    assert [_tokens(g) for g in got] == [_tokens(w) for w in want]
    assert not any(w.cuda_graph for w in want)
    # Every step fits a graph but the first, whose prompts take more rows than its largest:
    # the late request's prompt (step 3) rides with the others' decodes in one.
    first_rows = sum(len(p) for name, p in prompts.items() if name != "seeded-a")
    assert first_rows > MAX_GRAPH_ROWS
    assert [g.cuda_graph for g in got] == [False] + [True] * 9


def _two_ranks(rank: int, port: int, path: str) -> None:
    """One rank of two (gloo): the first test's steps through the graphs and eagerly, each with
    this rank's shard of the model; the tokens agree, and are the other rank's."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on a GPU host too (CPU tensors: not NCCL)
    distributed.init(rank, 2, "127.0.0.1", port)
    try:
        # Rank 0 samples (seeded, penalized, min_tokens) and broadcasts; then every row plain
        # greedy: the graphs' own argmax over the ranks' shards.
        for names, late in (
            (["greedy-a", "greedy-b", "seeded-a", "penalized-a", "min_tokens-a"], "seeded-a"),
            (["greedy-a", "greedy-b", "greedy-c"], "greedy-c"),
        ):
            steps = plans(random_prompts(names, seed=3), steps=10, late=late, leaves="none")
            eager, graphed = runner_with_cache(path, "cpu"), graphed_runner(path)
            want = [eager.execute(plan) for plan in steps]
            got = [graphed.execute(plan) for plan in steps]
            assert [_tokens(g) for g in got] == [_tokens(w) for w in want], f"rank {rank}"
            assert [g.cuda_graph for g in got][1:] == [True] * 9
            tokens = torch.tensor([t for g in got for t in g.token_ids])
            both = [torch.empty_like(tokens) for _ in range(2)]
            torch.distributed.all_gather(both, tokens)
            assert torch.equal(both[0], both[1]), "the ranks disagree"
    finally:
        distributed.destroy()


def test_prefills_through_the_graphs_on_two_ranks_sample_what_eager_steps_do(tiny_llama_dir):
    """Tensor parallel: the graphs hold the collectives (here run eagerly over gloo), each
    rank's rows the same tokens at the same positions; the greedy argmax over the ranks'
    shards and rank 0's sampling (seeded, penalized) pick what eager steps pick."""
    path, _ = tiny_llama_dir
    port = free_port()
    mp.start_processes(_two_ranks, args=(port, str(path)), nprocs=2, start_method="spawn")


def test_a_chunked_prompt_through_the_graphs_samples_what_eager_steps_do(tiny_llama_dir):
    """A 40-token prompt in chunks of 13 (each after the first attends to the chunks before it,
    in the cache, and to its own tokens written in the same step), then decodes; beside it a
    3-token prompt decoding from the first step."""
    path, _ = tiny_llama_dir
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(4, 250, (n,), generator=gen).tolist() for n in (40, 3)]
    want = greedy_plan_runner(runner_with_cache(path, "cpu"), prompts, 6, chunk=13)
    replayed = []
    got = greedy_plan_runner(
        graphed_runner(path), prompts, 6, chunk=13, on_result=lambda r: replayed.append(r)
    )
    assert got == want
    # 13 + 3 rows, then 13 + 1 twice, then 1 + 1: every step fits the 16-row graph.
    assert [r.cuda_graph for r in replayed] == [True] * len(replayed) and len(replayed) >= 4


def test_prefill_chunks_past_the_pairs_bound_run_eagerly(tiny_llama_dir, monkeypatch):
    """A step whose chunks' (tokens x context) pass GRAPH_PREFILL_PAIRS runs eagerly, even where
    its tokens fit a graph's rows (bound lowered to 100 for the tiny model's short contexts)."""
    path, _ = tiny_llama_dir
    monkeypatch.setattr(model_runner, "GRAPH_PREFILL_PAIRS", 100)
    greedy = worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0)
    graphed = graphed_runner(path)
    replayed = {}
    for rid, tokens, first_block in (("ten", 10, 0), ("eleven", 11, 4)):  # 100 and 121 pairs
        plan = worker_pb2.StepPlan(step_id=len(replayed) + 1)
        plan.new_requests.append(
            worker_pb2.NewRequest(
                request_id=rid,
                token_ids=list(range(4, 4 + tokens)),
                sampling=greedy,
                block_ids=list(range(first_block, first_block + 3)),
                num_scheduled_tokens=tokens,
            )
        )
        replayed[rid] = graphed.execute(plan).cuda_graph
    assert replayed == {"ten": True, "eleven": False}


@pytest.mark.parametrize(
    "names",
    [
        ["greedy-a", "greedy-b", "seeded-a", "unseeded-a", "min_tokens-a", "penalized-a"],
        ["greedy-a", "greedy-b", "greedy-c"],  # the graph's own argmax, its samplers' rows
    ],
    ids=["sampled", "greedy"],
)
def test_launching_ahead_through_the_graphs_gives_the_tokens_of_one_step_at_a_time(
    tiny_llama_dir, names
):
    """The worker launches step N + 1 before N's tokens reach the host: a graph step with a
    prompt's rows beside decoding rows whose input tokens are still on the device (the graph
    gathers them from the step before's sampled tokens, which the samplers' rows left there)."""
    path, _ = tiny_llama_dir
    prompts = random_prompts(names, seed=4)
    steps = plans(prompts, steps=10, late=names[2], leaves="none")
    eager = runner_with_cache(path, "cpu")
    want = [eager.execute(plan) for plan in steps]

    service = WorkerService(on_shutdown=None)
    service.runner = runner = graphed_runner(path)
    in_flight = []  # per launch: did a request wait for a token of the step before?
    launch = runner.launch

    def recording_launch(plan):
        rows = [s.row for s in runner.requests.values()]
        in_flight.append(bool((runner.rows.num_tokens[rows] > runner.rows.num_known[rows]).any()))
        return launch(plan)

    runner.launch = recording_launch
    got = list(service.Execute(iter(steps), context=None))
    assert [_tokens(g) for g in got] == [_tokens(w) for w in want]
    # Step 3 brings the late prompt: its rows and the others' in-flight decodes in one graph;
    # the first step's prompts fit one when they take at most its rows.
    first_rows = sum(len(p) for name, p in prompts.items() if name != names[2])
    assert [g.cuda_graph for g in got] == [first_rows <= MAX_GRAPH_ROWS] + [True] * 9
    assert in_flight[2] and all(in_flight[1:])


def test_a_mixed_step_tells_the_attention_what_its_decodes_attend(tiny_llama_dir, monkeypatch):
    """AttentionMetadata.one_token_context (the prefill kernel's launch split): the seq_lens of
    the step's one-token sequences summed, 0 in a step of prompt chunks alone. Prompts of 9, 5
    and 7 tokens in chunks of 4: chunks alone, then chunks beside decodes."""
    from worker.layers import attention

    seen = []

    def spy(*args, **kwargs):
        seen.append((args[5].tolist(), args[4].tolist(), kwargs["one_token_context"]))
        return paged_attention(*args, **kwargs)

    paged_attention = attention.paged_attention
    monkeypatch.setattr(attention, "paged_attention", spy)
    path, _ = tiny_llama_dir
    runner = runner_with_cache(path, "cpu")
    greedy_plan_runner(runner, [[5] * 9, [6] * 5, [7] * 7], 3, chunk=4)
    assert seen, "no attention ran"
    for query_start_loc, seq_lens, one_token_context in seen:
        query_lens = [b - a for a, b in zip(query_start_loc, query_start_loc[1:], strict=False)]
        want = sum(n for q, n in zip(query_lens, seq_lens, strict=True) if q == 1)
        assert one_token_context == want
    assert any(ctx > 0 for *_, ctx in seen) and any(ctx == 0 for *_, ctx in seen)
