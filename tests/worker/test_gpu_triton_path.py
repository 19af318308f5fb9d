"""On a GPU: SmolLM2 in fp32 on the Triton kernels gives the same greedy tokens as on the torch
reference path (CPU), for the demo's prompts, batched and with chunked prefill."""

import pytest
import torch

from cluster.demo import PROMPTS
from tests.worker.conftest import greedy_plan_runner
from worker.loader import load_model
from worker.model_runner import ModelRunner

pytestmark = pytest.mark.gpu


def _runner(path: str, device: str) -> ModelRunner:
    dev = torch.device(device)
    model = load_model(path, "gguf", torch.float32, dev, seed=0)
    runner = ModelRunner(model, dev, torch.float32, seed=0)
    runner.init_cache(num_blocks=256, block_size=16)
    return runner


def test_triton_path_matches_reference_path_fp32(smollm2_path, hf_smollm2):
    _, tokenizer = hf_smollm2
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in PROMPTS
    ]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    reference = greedy_plan_runner(_runner(smollm2_path, "cpu"), ids, 48, block_size=16)
    triton_path = greedy_plan_runner(_runner(smollm2_path, "cuda"), ids, 48, block_size=16)
    chunked = greedy_plan_runner(_runner(smollm2_path, "cuda"), ids, 48, chunk=7, block_size=16)
    assert triton_path == reference
    assert chunked == reference
