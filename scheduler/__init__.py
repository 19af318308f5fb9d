"""Pure-Python control plane: requests, the page table, the scheduling policy, the engine loop
and the Serving gRPC service. Nothing here imports torch, worker or kernels."""

from scheduler.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
