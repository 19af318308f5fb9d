"""What users touch: the YAML config, the Ray launcher, the gRPC client, the offline LLM API,
its asyncio twin AsyncLLM and the `pagedserve` CLI."""

from cluster.async_llm import AsyncLLM
from cluster.llm import LLM
from cluster.outputs import CompletionOutput, RequestOutput
from scheduler.sampling_params import RequestOutputKind, SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]
