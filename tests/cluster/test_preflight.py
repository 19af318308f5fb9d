"""The checks of a config against its model before any worker loads it: the model's shape as
its workers will report it, read without its weights; configs that would fail only after the
model loaded fail with a sentence naming the key."""

import pytest
import torch

from cluster.config import config_from_dict
from cluster.preflight import ModelShape, check_before_loading, model_shape
from tests.conftest import TINY_ARCHS
from worker.loader import load_model

# The tiny llama's shape: a context of 256, 2 layers, 2 KV heads of 16 dims.
TINY = ModelShape(max_positions=256, num_layers=2, num_kv_heads=2, head_dim=16)


def test_the_shape_is_what_the_loaded_model_reports(tiny_models, smollm2_path):
    for arch in TINY_ARCHS:
        path = str(tiny_models[arch][0])
        model = load_model(path, "auto", torch.float32, torch.device("cpu"), seed=0)
        assert model_shape(path) == ModelShape(model.max_positions, *model.kv_cache_spec()), arch
    assert model_shape(str(tiny_models["llama"][0])) == TINY
    assert model_shape(smollm2_path) == ModelShape(8192, 30, 3, 64)


@pytest.mark.parametrize(
    "sections, cpu_workers, message",
    [
        (
            {"model": {"max_model_len": 257}},
            False,
            r"model\.max_model_len=257 exceeds the model's context length of 256 tokens",
        ),
        (
            {"cache": {"num_blocks": 31, "block_size": 8}},
            False,
            r"the model's context length \(256 tokens\) does not fit the KV cache: "
            r"cache\.num_blocks=31 x cache\.block_size=8 = 248 tokens; set model\.max_model_len",
        ),
        (  # 2 layers x 2 KV heads x 16 dims x 16 slots x K and V x float32: 8 KiB a block
            {"cache": {"cpu_cache_gb": 2 * 8 * 1024 / 2**30}},  # 2 blocks: 32 tokens
            True,
            r"the model's context length \(256 tokens\) does not fit the KV cache: "
            r"cache\.cpu_cache_gb=.* \(2 blocks of this model\)",
        ),
        (
            {"model": {"max_model_len": 64}, "cache": {"cpu_cache_gb": 8 * 1024 / 2**30}},
            True,
            r"model\.max_model_len \(64 tokens\) does not fit the KV cache",
        ),
        (  # bfloat16 on GPUs: 4 KiB a block, 2**31 of them in 8 TiB
            {"cache": {"cpu_cache_gb": 8192.0}},
            False,
            r"cache\.cpu_cache_gb=8192\.0 holds 2\.147e\+09 blocks of 4096 bytes",
        ),
        (
            {"cache": {"swap_space_gb": 1e300}},
            True,
            r"cache\.swap_space_gb=1e\+300 holds inf blocks .* beyond the 2147483647",
        ),
        (  # a rank of two holds 1 of the 2 KV heads: half the bytes a block (one rank: 2**30)
            {"parallel": {"tensor_parallel_size": 2}, "cache": {"swap_space_gb": 8192.0}},
            True,
            r"cache\.swap_space_gb=8192\.0 holds 2\.147e\+09 blocks of 4096 bytes",
        ),
    ],
)
def test_what_cannot_serve_the_model_fails_naming_the_key(sections, cpu_workers, message):
    config = config_from_dict(sections)
    with pytest.raises(ValueError, match=message):
        check_before_loading(config, TINY, cpu_workers)


@pytest.mark.parametrize("cpu_workers", [False, True])
def test_what_can_serve_the_model_passes(cpu_workers):
    config = config_from_dict(
        {"model": {"max_model_len": 256}, "cache": {"cpu_cache_gb": 4095.0, "swap_space_gb": 4095}}
    )
    check_before_loading(config, TINY, cpu_workers)
    # The exact fit: 32 blocks of 8 tokens hold the model's whole context.
    check_before_loading(
        config_from_dict({"cache": {"num_blocks": 32, "block_size": 8}}), TINY, cpu_workers
    )
