"""Programmatic dependent launch is taken on Hopper and later CUDA cards only, and
PAGEDSERVE_PDL=0 turns it off (to measure without it); the kernels' results with it on are the
GPU tests of each kernel and of the decode graphs."""

import torch

from kernels.triton_pdl import use_pdl


def test_pdl_only_on_cuda_cards_of_compute_capability_9_or_later(monkeypatch):
    assert not use_pdl(torch.device("cpu"))
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability() >= (9, 0)
        assert use_pdl(torch.device("cuda")) == hopper
        monkeypatch.setenv("PAGEDSERVE_PDL", "0")
        assert not use_pdl(torch.device("cuda"))
