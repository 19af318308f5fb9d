"""OPT (facebook/opt-*), read top to bottom: learned positions with their offset of 2,
LayerNorm before (or, for 350m, after) each block, ReLU, biases everywhere, an optional
projection between the embedding width and the hidden width, LM head tied to the embedding.
"""

from typing import Any

import torch
from torch import nn

from worker.layers.activation import get_activation
from worker.layers.attention import AttentionMetadata, PagedAttention
from worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from worker.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from worker.models.base import CausalLM

_POSITION_OFFSET = 2  # OPT's learned positions start at row 2 of the table


class OPTAttention(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        bias = hf.get("enable_bias", True)
        self.head_dim = hidden // heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=bias)
        self.num_heads = self.qkv_proj.num_heads_local
        self.out_proj = RowParallelLinear(
            hidden, hidden, bias=bias, input_shard=self.qkv_proj.q_shard
        )
        self.scaling = self.head_dim**-0.5
        # HF scales q before the product (then attends with scale 1): the same rounding here.
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=1.0)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        q = (q * self.scaling).view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_heads, self.head_dim)
        v = v.view(n, self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q, k, v, meta).reshape(n, -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden, bias = hf["hidden_size"], hf.get("enable_bias", True)
        affine = hf.get("layer_norm_elementwise_affine", True)
        self.pre_norm = hf.get("do_layer_norm_before", True)
        self.self_attn = OPTAttention(hf)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.fc1 = ColumnParallelLinear(hidden, hf["ffn_dim"], bias=bias)
        self.fc2 = RowParallelLinear(hf["ffn_dim"], hidden, bias=bias)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine)
        self.act = get_activation(hf.get("activation_function", "relu"))

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, meta)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.fc2(self.act(self.fc1(h)))
        return x if self.pre_norm else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        hidden = hf["hidden_size"]
        embed_dim = hf.get("word_embed_proj_dim") or hidden
        affine = hf.get("layer_norm_elementwise_affine", True)
        self.embed_tokens = VocabParallelEmbedding(hf["vocab_size"], embed_dim)
        self.embed_positions = nn.Embedding(
            hf["max_position_embeddings"] + _POSITION_OFFSET, hidden
        )
        projected = embed_dim != hidden
        self.project_in = nn.Linear(embed_dim, hidden, bias=False) if projected else None
        self.project_out = nn.Linear(hidden, embed_dim, bias=False) if projected else None
        final_norm = hf.get("do_layer_norm_before", True) and not hf.get(
            "_remove_final_layer_norm", False
        )
        self.final_layer_norm = (
            nn.LayerNorm(hidden, elementwise_affine=affine) if final_norm else None
        )
        self.layers = nn.ModuleList(OPTDecoderLayer(hf) for _ in range(hf["num_hidden_layers"]))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + _POSITION_OFFSET)
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x if self.project_out is None else self.project_out(x)


class OPTModel(nn.Module):
    def __init__(self, hf: dict[str, Any]) -> None:
        super().__init__()
        self.decoder = OPTDecoder(hf)


class OPTForCausalLM(CausalLM):
    packed = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    tied = ("lm_head.weight",)

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        self.vocab_size = hf_config["vocab_size"]
        self.max_positions = hf_config["max_position_embeddings"]
        self.model = OPTModel(hf_config)
        embed_dim = hf_config.get("word_embed_proj_dim") or hf_config["hidden_size"]
        self.lm_head = ParallelLMHead(self.vocab_size, embed_dim)
        self.lm_head.weight = self.model.decoder.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta)

    def checkpoint_name(self, name: str) -> str | None:
        return f"model.{name}" if name.startswith("decoder.") else name
