"""What users touch: the YAML config, the Ray launcher, the gRPC client, the offline LLM API
and the `pagedserve` CLI."""

from cluster.llm import LLM, CompletionOutput, RequestOutput
from scheduler.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "RequestOutputKind", "SamplingParams"]
