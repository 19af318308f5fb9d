"""Builds a model and loads its weights: GGUF (dequantized), HF safetensors directories, or dummy.

The model is built on the meta device and materialized on the target device, so no weight is
held twice; every parameter must be filled by the checkpoint (a missing one is an error).
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.layers.rotary import RotaryEmbedding
from worker.models import ARCHITECTURES, LlamaConfig

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def detect_format(path: str, load_format: str) -> str:
    if load_format != "auto":
        return load_format
    if path.endswith(".gguf"):
        return "gguf"
    if Path(path, "config.json").is_file():
        return "safetensors"
    raise ValueError(f"model path {path!r} is neither a .gguf file nor an HF directory")


def load_model(
    path: str, load_format: str, dtype: torch.dtype, device: torch.device, seed: int
) -> nn.Module:
    """Returns the model in eval mode on device, weights in dtype."""
    fmt = detect_format(path, load_format)
    if fmt == "dummy":
        hf_config = _read_hf_config(path)
    elif fmt == "gguf":
        hf_config = gguf_hf_config(path)
    elif fmt == "safetensors":
        hf_config = _read_hf_config(path)
    else:
        raise ValueError(f"load_format {load_format!r}: expected auto, gguf, safetensors or dummy")
    arch = hf_config["architectures"][0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch} is not supported (have {sorted(ARCHITECTURES)})")
    cfg = LlamaConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = ARCHITECTURES[arch](cfg)
    model.to_empty(device=device)
    model.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if fmt == "dummy":
        _fill_dummy(model, seed)
    else:
        weights = _gguf_weights(path, cfg) if fmt == "gguf" else _safetensors_weights(path)
        _load_named(model, weights)
    # Buffers were materialized empty: compute the rotary tables on the device.
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
    return model.eval()


def _load_named(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    loaded = set()
    for name, tensor in weights:
        if name not in params:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"checkpoint tensor {name} has no parameter in the model")
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model {param.shape}")
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    missing = set(params) - loaded
    if missing:
        raise ValueError(f"checkpoint lacks {sorted(missing)[:5]} ({len(missing)} in all)")


def _fill_dummy(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)


def _read_hf_config(path: str) -> dict[str, Any]:
    if path.endswith(".gguf"):
        return gguf_hf_config(path)
    config_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    return json.loads(config_path.read_text())


def _safetensors_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def gguf_hf_config(path: str) -> dict[str, Any]:
    """The HF config.json equivalent of a GGUF file's metadata (Llama architecture)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = _gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} in {path} is not supported (have llama)")
    names = {t.name for t in reader.tensors}
    heads = int(_gguf_field(reader, "llama.attention.head_count"))
    hidden = int(_gguf_field(reader, "llama.embedding_length"))
    vocab = _gguf_field(reader, "llama.vocab_size", None)
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_gguf_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_gguf_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_gguf_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_gguf_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_gguf_field(reader, "llama.context_length")),
        "tie_word_embeddings": "output.weight" not in names,
    }


def _gguf_field(reader: Any, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata lacks {key}")
        return default
    return field.contents()


def _gguf_weights(path: str, cfg: LlamaConfig) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    for tensor in GGUFReader(path).tensors:
        name = _gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        # ggml lists dimensions innermost first: reverse for torch's [out, in].
        array = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
        if ".q_proj." in name:
            array = _unpermute_rotary(array, cfg.num_attention_heads)
        elif ".k_proj." in name:
            array = _unpermute_rotary(array, cfg.num_key_value_heads)
        yield name, torch.from_numpy(np.array(array, dtype=np.float32))  # a writable copy


def _gguf_to_hf_name(name: str) -> str | None:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in _GGUF_LAYER_NAMES:
            return None
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{suffix}"
    return f"{_GGUF_TOP_NAMES[base]}.{suffix}" if base in _GGUF_TOP_NAMES else None


def _unpermute_rotary(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp interleaves each head's rotary halves in q/k; restore HF's rotate-half order."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
