"""Pure-Python control plane. The engine core: requests, the page table, the scheduling policy,
the router, the engine loop, the replica fleet and the EngineCore gRPC service (token ids only).
scheduler.frontend: the processes in front of it that serve clients. Nothing here imports
torch, worker or kernels."""

from scheduler.sampling_params import SamplingParams

__all__ = ["SamplingParams"]
