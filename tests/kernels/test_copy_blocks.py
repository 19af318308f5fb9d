"""Triton copy_blocks against the torch reference (CPU interpreter or GPU)."""

import pytest
import torch

from kernels.copy_blocks import copy_blocks_ref


def _layers(num_layers, shape, dtype, device, gen):
    return [torch.randn(shape, generator=gen).to(dtype).to(device) for _ in range(num_layers)]


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_blocks_matches_reference(device, block_size, dtype):
    from kernels.triton_copy_blocks import copy_blocks

    gen = torch.Generator().manual_seed(block_size)
    shape = (7, block_size, 2, 16)
    keys = _layers(3, shape, dtype, device, gen)
    values = _layers(3, shape, dtype, device, gen)
    expected_k = [k.clone() for k in keys]
    expected_v = [v.clone() for v in values]
    mapping = torch.tensor([[0, 5], [2, 3], [6, 1]])  # no dst is a src
    copy_blocks(keys, values, mapping)
    copy_blocks_ref(expected_k, expected_v, mapping.to(device))
    for got, expected in zip(keys + values, expected_k + expected_v, strict=True):
        assert torch.equal(got, expected)


def test_copy_blocks_cache_views_and_empty_mapping(device):
    """Per-layer caches that are views of one [layers, 2, ...] allocation (block stride larger
    than a block), an int32 mapping, and an empty mapping that must launch nothing."""
    from kernels.triton_copy_blocks import copy_blocks

    gen = torch.Generator().manual_seed(1)
    storage = torch.randn(2, 5, 2, 8, 3, 16, generator=gen).to(device)  # [layers, blocks, k/v,..]
    keys = [storage[layer, :, 0] for layer in range(2)]
    values = [storage[layer, :, 1] for layer in range(2)]
    before = storage.clone()
    copy_blocks(keys, values, torch.zeros(0, 2, dtype=torch.int64))
    assert torch.equal(storage, before)
    copy_blocks(keys, values, torch.tensor([[4, 0]], dtype=torch.int32))
    expected = before.clone()
    expected[:, 0] = before[:, 4]
    assert torch.equal(storage, expected)


@pytest.mark.gpu
def test_copy_blocks_gpu_dispatch_realistic():
    import kernels

    shape = (512, 16, 8, 128)
    keys = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    values = [torch.randn_like(k) for k in keys]
    expected_k = [k.clone() for k in keys]
    expected_v = [v.clone() for v in values]
    mapping = torch.stack([torch.arange(0, 64), torch.arange(256, 320)], dim=1)
    kernels.copy_blocks(keys, values, mapping)
    copy_blocks_ref(expected_k, expected_v, mapping.cuda())
    for got, expected in zip(keys + values, expected_k + expected_v, strict=True):
        assert torch.equal(got, expected)
