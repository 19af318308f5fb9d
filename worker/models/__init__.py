"""Model architectures, each plain PyTorch on the paged KV cache, named after HF's config."""

from worker.models.llama import LlamaConfig, LlamaForCausalLM

ARCHITECTURES = {"LlamaForCausalLM": LlamaForCausalLM}

__all__ = ["ARCHITECTURES", "LlamaConfig", "LlamaForCausalLM"]
