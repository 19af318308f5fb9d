"""Model architectures, each plain PyTorch on the paged KV cache, keyed by HF's class name."""

from worker.models.base import CausalLM
from worker.models.gpt2 import GPT2LMHeadModel
from worker.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from worker.models.opt import OPTForCausalLM

ARCHITECTURES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
    "GPT2LMHeadModel": GPT2LMHeadModel,
}

__all__ = ["ARCHITECTURES", "CausalLM"]
