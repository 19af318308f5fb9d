"""The Llama architecture and its close kin (SmolLM2, Llama 2/3, Mistral, Qwen2 / Qwen2.5),
read top to bottom. Tensor-parallel: merged QKV and gate-up projections are column-parallel,
o_proj and down_proj row-parallel; each of their outputs is summed over the ranks by the norm
that follows it (the all-reduce, the residual add and RMSNorm: one kernel where it can).

Parameter names follow HF checkpoints (model.layers.N.self_attn.qkv_proj.weight holds q_proj,
k_proj and v_proj). Activations are flat over the batch: [num_tokens, hidden_size].
"""

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kernels import silu_and_mul
from worker import distributed
from worker.layers.attention import AttentionMetadata, PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.layers.norm import RMSNorm
from worker.layers.rotary import RotaryEmbedding
from worker.models.base import CausalLM


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: biases on q, k and v (not o)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """From an HF config.json dict (old rope_theta / rope_scaling or new rope_parameters)."""
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        heads = hf["num_attention_heads"]
        qwen = hf["architectures"][0].startswith("Qwen2")
        max_positions = hf.get("max_position_embeddings", 2048)
        if hf["architectures"][0] == "MistralForCausalLM" and hf.get("sliding_window"):
            # Full attention equals sliding-window attention up to the window: cap the context.
            max_positions = min(max_positions, hf["sliding_window"])
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            rope_scaling=rope or None,
            max_position_embeddings=max_positions,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=qwen or hf.get("attention_bias", False),
        )


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            bias=cfg.qkv_bias,
        )
        self.num_heads = self.qkv_proj.num_heads_local
        self.num_kv_heads = self.qkv_proj.num_kv_heads_local
        self.head_dim = cfg.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim,
            cfg.hidden_size,
            bias=False,
            input_shard=self.qkv_proj.q_shard,
            reduce_results=False,
        )
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, meta, self.rotary, positions)  # [n, num_heads_local, head_dim]
        return self.o_proj(out.reshape(n, -1))  # this rank's part of the sum over ranks


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], bias=False)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias=False, reduce_results=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's part of the MLP's output (summed over the ranks by the next norm)."""
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [num_tokens, hidden_size]: this rank's part of the previous layer's MLP output,
        not yet summed over the ranks nor added to the residual stream (residual None for the
        first layer of one rank, whose x is the whole embedding; zeros for the first of several,
        whose x is this rank's part of it). Returns this layer's MLP output (this
        rank's part) and the stream before it: each sum and add is fused into the norm after
        it, and a + b == b + a in floating point, so this is HF's x = x + f(norm(x)) exactly."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual, sum_ranks=True)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual, sum_ranks=True)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens.local(input_ids)  # [num_tokens, hidden_size], this rank's part
        # With several ranks the first layer sums the parts in its input norm, as every other
        # layer sums its input (x + 0 == x): one fused all-reduce + norm instead of two calls.
        residual = torch.zeros_like(x) if distributed.tp_size() > 1 else None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual, sum_ranks=True)[0]


class LlamaForCausalLM(CausalLM):
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        cfg = LlamaConfig.from_hf(hf_config)
        self.config = cfg
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        self.model = LlamaModel(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
            self.tied = ("lm_head.weight",)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def checkpoint_name(self, name: str) -> str | None:
        return None if "rotary_emb.inv_freq" in name else name


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: Llama with biases on q, k and v."""
