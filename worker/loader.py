"""Builds a model and loads this rank's shard of its weights: GGUF (dequantized), HF
directories (safetensors or .bin), or dummy (random weights of a real shape).

The model is built on the meta device and materialized on the target device, so no weight is
held twice; every parameter must be filled by the checkpoint (a missing one is an error).
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.gguf_header import read_gguf_header
from worker.layers.rotary import RotaryEmbedding
from worker.models import ARCHITECTURES, CausalLM
from worker.models.presets import PRESETS

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


def read_hf_config(path: str) -> dict[str, Any]:
    """The HF config of a preset name, a .gguf file, an HF directory or a config.json file."""
    if path.lower() in PRESETS:
        return PRESETS[path.lower()]
    if path.endswith(".gguf"):
        return gguf_hf_config(path)
    config_path = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    return json.loads(config_path.read_text())


def meta_model(hf_config: dict[str, Any]) -> CausalLM:
    """The model of an HF config on the meta device: its structure (this rank's share of it),
    no weights."""
    arch = hf_config["architectures"][0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch} is not supported (have {', '.join(ARCHITECTURES)})")
    with torch.device("meta"):
        return ARCHITECTURES[arch](hf_config)


def load_model(
    path: str, load_format: str, dtype: torch.dtype, device: torch.device, seed: int
) -> CausalLM:
    """Returns the model in eval mode on device, weights in dtype."""
    fmt = detect_format(path, load_format)
    if fmt not in ("gguf", "safetensors", "dummy"):
        raise ValueError(f"load_format {load_format!r}: expected auto, gguf, safetensors or dummy")
    hf_config = read_hf_config(path)
    model = meta_model(hf_config)
    before = dict(model.named_parameters(remove_duplicate=False))
    model.to_empty(device=device)
    model.to(dtype)
    _restore_parameters(model, before)
    if fmt == "dummy":
        _fill_dummy(model, seed)
    elif fmt == "gguf":
        model.load_weights(_gguf_weights(path, hf_config))
    else:
        model.load_weights(_hf_dir_weights(path))
    # Buffers were materialized empty: compute the rotary tables on the device.
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device)
    return model.eval()


def _restore_parameters(model: CausalLM, before: dict[str, torch.nn.Parameter]) -> None:
    """to_empty() makes new parameters: restore the sharing (tied embeddings) and the
    weight_loader attributes that the meta model's parameters had."""
    first_of: dict[int, str] = {}
    for name, old in before.items():
        owner = first_of.setdefault(id(old), name)
        if owner != name:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, model.get_parameter(owner))
        elif hasattr(old, "weight_loader"):
            model.get_parameter(name).weight_loader = old.weight_loader


def _fill_dummy(model: CausalLM, seed: int) -> None:
    """Seeded random weights (std 0.02), norms 1: every rank fills only its own shard, drawn
    on the parameters' device (an 8B model's 32 GB of float32 draws take a minute on one CPU
    core, milliseconds on a GPU), so the weights depend on the seed and the device type."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                values = torch.randn(
                    param.shape, generator=gen, dtype=torch.float32, device=device
                )
                param.copy_(values * 0.02)


def _hf_dir_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(path).glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        return
    bins = sorted(Path(path).glob("*.bin"))
    if not bins:
        raise ValueError(f"no *.safetensors or *.bin weights in {path}")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def gguf_hf_config(path: str) -> dict[str, Any]:
    """The HF config.json equivalent of a GGUF file's metadata (Llama architecture), read from
    the file's header alone."""
    header = read_gguf_header(path)
    fields = header.metadata

    def field(key: str, default: Any = ...) -> Any:
        if key not in fields and default is ...:
            raise ValueError(f"GGUF metadata lacks {key}")
        return fields.get(key, default)

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} in {path} is not supported (have llama)")
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    vocab = field("llama.vocab_size", None)
    if vocab is None:
        vocab = field("tokenizer.ggml.tokens")  # an array: its length
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(field("llama.feed_forward_length")),
        "num_hidden_layers": int(field("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("llama.attention.head_count_kv", heads)),
        "head_dim": int(field("llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("llama.context_length")),
        "tie_word_embeddings": "output.weight" not in header.tensor_names,
    }


def _gguf_weights(path: str, hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    heads, kv_heads = hf_config["num_attention_heads"], hf_config["num_key_value_heads"]
    for tensor in GGUFReader(path).tensors:
        name = _gguf_to_hf_name(tensor.name)
        if name is None:
            continue
        # ggml lists dimensions innermost first: reverse for torch's [out, in].
        array = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape)))
        if ".q_proj." in name:
            array = _unpermute_rotary(array, heads)
        elif ".k_proj." in name:
            array = _unpermute_rotary(array, kv_heads)
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
