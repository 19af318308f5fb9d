"""Decode CUDA graphs: replaying a captured graph gives the same tokens as running the same steps
eagerly, for every captured batch size and for sizes between them (padded rows), in float32,
also for prefills that fit a graph one row a token.
The size ladder is checked on the CPU; the tensor-parallel graphs by tests/e2e on two GPUs."""

import numpy as np
import pytest
import torch

from tests.worker.conftest import RecordingRunner, greedy_plan_runner
from worker import model_runner
from worker.cuda_graph import GraphInputs, capture_sizes, size_for
from worker.loader import load_model
from worker.model_runner import GRAPH_PROMPT_ROWS

MAX_NUM_SEQS = 40
MAX_ROWS = MAX_NUM_SEQS + GRAPH_PROMPT_ROWS  # the largest graph


def test_capture_sizes_cover_every_row_count_up_to_max_rows():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(42) == [1, 2, 4, 8, 16, 24, 32, 40, 42]
    ladder = capture_sizes(512)  # the GPU default: 51 graphs, every 16 beyond 256
    assert ladder[:4] == [1, 2, 4, 8] and ladder[34:37] == [256, 272, 288] and ladder[-1] == 512
    assert len(ladder) == 51 and all(b - a <= 16 for a, b in zip(ladder, ladder[1:], strict=False))
    assert capture_sizes(300)[-5:] == [248, 256, 272, 288, 300]


def test_a_step_replays_the_smallest_size_that_holds_it():
    ladder = capture_sizes(300)
    for n in range(1, 302):
        holding = [s for s in ladder if s >= n]
        assert size_for(ladder, n) == (min(holding) if holding else None)
    assert [size_for(ladder, n) for n in (1, 3, 9, 257, 300, 301)] == [1, 4, 16, 272, 300, None]


def _runner(path, enforce_eager: bool) -> RecordingRunner:
    device = torch.device("cuda")
    model = load_model(str(path), "auto", torch.float32, device, seed=0)
    runner = RecordingRunner(model, device, torch.float32, seed=0)
    runner.init_cache(
        num_blocks=MAX_ROWS * 16,  # a request of the largest batch: at most 64 tokens
        block_size=4,
        max_num_seqs=MAX_NUM_SEQS,
        max_model_len=64,
        enforce_eager=enforce_eager,
    )
    return runner


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_graph_replay_equals_eager_for_every_captured_size(tiny_models, arch, monkeypatch):
    monkeypatch.setattr(model_runner, "GRAPH_PREFILL_PAIRS", 1 << 30)  # every prompt in a graph
    path, _ = tiny_models[arch]
    graphed, eager = _runner(path, False), _runner(path, True)
    assert sorted(graphed.graphs.graphs) == capture_sizes(MAX_ROWS)
    gen = torch.Generator().manual_seed(0)
    for batch in sorted({*capture_sizes(MAX_ROWS), 3, 5, 17, 39, MAX_ROWS - 1}):
        lengths = torch.randint(1, 20, (batch,), generator=gen).tolist()
        prompts = [torch.randint(1, 200, (n,), generator=gen).tolist() for n in lengths]
        graphed.results.clear()
        want = greedy_plan_runner(eager, prompts, 6)
        got = greedy_plan_runner(graphed, prompts, 6)
        assert got == want, f"batch {batch}"
        # The first step prefills, one graph row a prompt token when they fit the largest
        # graph (GRAPH_PREFILL_PAIRS set far off); each later one decodes every
        # request: a replay.
        first = sum(lengths) <= MAX_ROWS
        graph_steps = [r.cuda_graph for r in graphed.results]
        assert graph_steps == [first] + [True] * 5, f"batch {batch}"
        assert not any(r.cuda_graph for r in eager.results)


def test_graph_inputs_move_in_one_copy_of_the_rows_a_step_uses():
    device, host = GraphInputs(6, 3, torch.device("cpu")), GraphInputs(6, 3, torch.device("cpu"))
    device.block_tables.fill_(-7)
    host.host_ids[:] = np.arange(24).reshape(4, 6)
    host.host_seq_lens[:] = np.arange(6) + 1
    host.host_tables[:] = np.arange(18).reshape(6, 3)
    device.copy_from(host, num_table_rows=2)
    assert torch.equal(device.ids, torch.arange(24).view(4, 6))
    assert device.seq_lens.tolist() == [1, 2, 3, 4, 5, 6]
    assert device.block_tables[:2].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert (device.block_tables[2:] == -7).all()  # rows past the step's keep what they held
