"""GPT-2, read top to bottom: learned positions, LayerNorm before each block, gelu_new,
Conv1D checkpoints ([in, out] weights, transposed here as they load), q/k/v in one c_attn
tensor, LM head tied to the token embedding."""

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from worker.layers.activation import get_activation
from worker.layers.attention import AttentionMetadata, PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.models.base import CausalLM

_CONV1D = ("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT2Attention(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden, heads = hf["n_embd"], hf["n_head"]
        self.head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=True)
        self.num_heads = self.qkv_proj.num_heads_local
        self.c_proj = RowParallelLinear(
            hidden, hidden, bias=True, input_shard=self.qkv_proj.q_shard
        )
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = (t.view(n, self.num_heads, self.head_dim) for t in self.qkv_proj(x).chunk(3, -1))
        return self.c_proj(self.attn(q, k, v, meta).reshape(n, -1))


class GPT2MLP(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden = hf["n_embd"]
        inner = hf.get("n_inner") or 4 * hidden
        self.c_fc = ColumnParallelLinear(hidden, inner, bias=True)
        self.c_proj = RowParallelLinear(inner, hidden, bias=True)
        self.act = get_activation(hf.get("activation_function", "gelu_new"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = hf["n_embd"], hf.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = GPT2Attention(hf)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = GPT2MLP(hf)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden = hf["n_embd"]
        self.wte = VocabParallelEmbedding(hf["vocab_size"], hidden)
        self.wpe = nn.Embedding(hf["n_positions"], hidden)
        self.h = nn.ModuleList(GPT2Block(hf) for _ in range(hf["n_layer"]))
        self.ln_f = nn.LayerNorm(hidden, eps=hf.get("layer_norm_epsilon", 1e-5))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x = block(x, meta)
        return self.ln_f(x)


class GPT2LMHeadModel(CausalLM):
    packed = {
        "attn.q_proj": ("attn.qkv_proj", "q"),
        "attn.k_proj": ("attn.qkv_proj", "k"),
        "attn.v_proj": ("attn.qkv_proj", "v"),
    }
    tied = ("lm_head.weight",)

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        if hf_config.get("scale_attn_by_inverse_layer_idx") or hf_config.get(
            "reorder_and_upcast_attn"
        ):
            raise ValueError(
                "GPT-2 attention variants (inverse layer scaling, upcast) are not supported"
            )
        self.vocab_size = hf_config["vocab_size"]
        self.max_positions = hf_config["n_positions"]
        self.transformer = GPT2Model(hf_config)
        self.lm_head = ParallelLMHead(self.vocab_size, hf_config["n_embd"])
        self.lm_head.weight = self.transformer.wte.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.transformer(input_ids, positions, meta)

    def checkpoint_name(self, name: str) -> str | None:
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers
            return None
        return name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(_split_conv1d(weights))


def _split_conv1d(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """Conv1D [in, out] -> Linear [out, in]; c_attn -> q_proj, k_proj, v_proj."""
    for name, tensor in weights:
        if ".attn.c_attn." in name:
            parts = (tensor.t() if name.endswith("weight") else tensor).chunk(3, dim=0)
            for part, proj in zip(parts, ("q_proj", "k_proj", "v_proj"), strict=True):
                yield name.replace("c_attn", proj), part
        elif name.endswith(_CONV1D):
            yield name, tensor.t()
        else:
            yield name, tensor
