"""Piecewise CUDA graphs: steps the whole-forward graphs do not take replay the forward pass in
pieces cut at each attention, the attention run eagerly between them.

On the CPU a replay of the pieces runs what they hold (EagerPieces: the forward over the static
buffers, the step's attention at each cut), so the runner's side (the static inputs, padding
tokens that write no KV, the attention of the step's own tokens, the hidden rows picked out) is
checked against the eager runner in float32. On a GPU the captured pieces do the same for every
captured size and for sizes between them."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.conftest import free_port
from tests.worker.conftest import RecordingRunner, greedy_plan_runner
from worker import distributed, model_runner
from worker.layers.attention import AttentionMetadata
from worker.loader import load_model
from worker.model_runner import ModelRunner
from worker.piecewise_graph import PiecewiseGraphs, _slice, piece_sizes

from .test_launch_ahead import runner_with_cache

MAX_TOKENS = 48


def test_piece_sizes_cover_every_token_count_up_to_max_tokens():
    assert piece_sizes(16) == [16]
    assert piece_sizes(20) == [16, 20]
    assert piece_sizes(48) == [16, 32, 48]
    ladder = piece_sizes(2048)  # PIECEWISE_MAX_TOKENS
    assert ladder[:3] == [16, 32, 48] and ladder[15:18] == [256, 288, 320]
    assert ladder[23:26] == [512, 576, 640] and ladder[31:34] == [1024, 1152, 1280]
    assert ladder[-1] == 2048 and len(ladder) == 40
    steps = [b - a for a, b in zip([0, *ladder], ladder, strict=False)]
    assert all(step <= max(16, size // 8) for step, size in zip(steps, ladder, strict=True))
    assert piece_sizes(300)[-3:] == [256, 288, 300]


class EagerPieces(PiecewiseGraphs):
    """Replays what the pieces of a size hold: the forward over the static inputs, the step's
    attention of its own tokens at each cut."""

    def capture(self) -> None:
        self.graphs = {size: [] for size in self.sizes}

    def _replay(self, size: int, n: int, meta: AttentionMetadata) -> None:
        def attend(layer) -> None:
            layer.attend(self.q[:n], meta, out=self.out[:n])

        self.forward(size, _slice(self._meta, size), attend)


def _pieced_runner(path) -> ModelRunner:
    runner = runner_with_cache(path, "cpu")
    runner.pieces = EagerPieces(runner.model, MAX_TOKENS, runner.device)
    runner.pieces.capture()
    return runner


def _chunked_prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(4, 250, (n,), generator=gen).tolist() for n in (40, 3, 25)]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
def test_steps_through_the_pieces_sample_what_eager_steps_do(tiny_models, arch):
    """Prompts of 40, 3 and 25 tokens in chunks of 13, then decodes: steps of 29, 26, 15 and 3
    tokens, each replaying the pieces of 32 or 16 with padding tokens, where a step's padding
    follows a larger step's real slots (they must write nothing)."""
    path, _ = tiny_models[arch]
    prompts = _chunked_prompts()
    want = greedy_plan_runner(runner_with_cache(path, "cpu"), prompts, 6, chunk=13)
    steps = []
    got = greedy_plan_runner(_pieced_runner(path), prompts, 6, chunk=13, on_result=steps.append)
    assert got == want
    assert all(r.piecewise_graph and not r.cuda_graph for r in steps) and len(steps) >= 6


def _two_ranks(rank: int, port: int, path: str) -> None:
    """One rank of two (gloo): the chunked prompts through the pieces and eagerly, each with
    this rank's shard (its q / out buffers of its own heads, the sums over ranks in the
    pieces)."""
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on a GPU host too (CPU tensors: not NCCL)
    distributed.init(rank, 2, "127.0.0.1", port)
    try:
        prompts = _chunked_prompts()
        want = greedy_plan_runner(runner_with_cache(path, "cpu"), prompts, 6, chunk=13)
        steps = []
        pieced = _pieced_runner(path)
        got = greedy_plan_runner(pieced, prompts, 6, chunk=13, on_result=steps.append)
        assert got == want, f"rank {rank}"
        assert all(r.piecewise_graph for r in steps) and len(steps) >= 6
        assert pieced.pieces.q.shape[1] == pieced.model.attention_layers()[0].num_heads
    finally:
        distributed.destroy()


def test_steps_through_the_pieces_on_two_ranks_sample_what_eager_steps_do(tiny_llama_dir):
    path, _ = tiny_llama_dir
    port = free_port()
    mp.start_processes(_two_ranks, args=(port, str(path)), nprocs=2, start_method="spawn")


def test_the_forward_cuts_at_every_attention_in_order(tiny_llama_dir):
    path, _ = tiny_llama_dir
    model = runner_with_cache(path, "cpu").model
    pieces = PiecewiseGraphs(model, MAX_TOKENS, torch.device("cpu"))
    pieces.inputs[2].fill_(-1)
    cuts = []
    hidden = pieces.forward(16, _slice(pieces._meta, 16), cuts.append)
    layers = model.attention_layers()
    assert len(cuts) == len(layers) >= 2 and all(a is b for a, b in zip(cuts, layers, strict=True))
    assert hidden.shape == (16, model.lm_head.weight.shape[1])
    assert all(layer.split is None for layer in layers)

    def fail(layer) -> None:
        raise RuntimeError("cut")

    with pytest.raises(RuntimeError, match="cut"):
        pieces.forward(16, _slice(pieces._meta, 16), fail)
    assert all(layer.split is None for layer in layers)  # the model is left as it was


def _gpu_runner(path, enforce_eager: bool) -> RecordingRunner:
    device = torch.device("cuda")
    model = load_model(str(path), "auto", torch.float32, device, seed=0)
    runner = RecordingRunner(model, device, torch.float32, seed=0)
    runner.init_cache(
        num_blocks=1024,
        block_size=4,
        max_num_seqs=8,
        max_model_len=64,
        enforce_eager=enforce_eager,
        max_num_batched_tokens=320,
    )
    return runner


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_piecewise_replay_equals_eager_for_every_captured_size(tiny_models, arch, monkeypatch):
    """Every prefill step replays the pieces (GRAPH_PREFILL_PAIRS 0: no prompt token rides a
    whole graph), of each captured size and of a size padded up to one; the decodes after it
    replay the whole graphs. The same tokens as eager steps."""
    monkeypatch.setattr(model_runner, "GRAPH_PREFILL_PAIRS", 0)
    path, _ = tiny_models[arch]
    pieced, eager = _gpu_runner(path, False), _gpu_runner(path, True)
    assert sorted(pieced.pieces.graphs) == piece_sizes(320) and eager.pieces is None
    gen = torch.Generator().manual_seed(0)
    for tokens in sorted({*piece_sizes(320), 17, 100, 319}):
        lengths = [20] * (tokens // 20) + ([tokens % 20] if tokens % 20 else [])
        prompts = [torch.randint(1, 200, (n,), generator=gen).tolist() for n in lengths]
        pieced.results.clear()
        want = greedy_plan_runner(eager, prompts, 4)
        got = greedy_plan_runner(pieced, prompts, 4)
        assert got == want, f"{tokens} tokens"
        flags = [(r.piecewise_graph, r.cuda_graph) for r in pieced.results]
        assert flags == [(True, False)] + [(False, True)] * 3, f"{tokens} tokens"
