import math
from typing import Any

import torch
from torch import nn

import kernels


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the "rotate half" layout of HF checkpoints.

    cos/sin are precomputed once for every position: cache [max_positions, head_dim].
    scaling: HF's rope parameters; "default" and Llama 3's "llama3" are supported.

    On CUDA q and k are rotated by one Triton kernel (kernels.triton_rotary; with the KV-cache
    write, kernels.triton_rotary_kv_cache); on the CPU by the torch reference (kernels.rotary),
    the same operations as HF's apply_rotary_pos_emb.
    """

    def __init__(
        self, head_dim: int, max_positions: int, base: float, scaling: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.base = head_dim, max_positions, base
        self.scaling = scaling or {}
        rope_type = self.scaling.get("rope_type", self.scaling.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (have default, llama3)")
        self.rope_type = rope_type
        self.register_buffer("cos_cache", torch.empty(0), persistent=False)
        self.register_buffer("sin_cache", torch.empty(0), persistent=False)
        # Built on the meta device (the loader; a model's shape read), it has no tables to fill:
        # the loader builds them on the target device once the model is materialized.
        if torch.get_default_device().type != "meta":
            self.build_cache(torch.device("cpu"))

    def build_cache(self, device: torch.device) -> None:
        """(Re)computes cos/sin in float32, as HF does, for every position; keeps them on device."""
        cpu = torch.device("cpu")  # computed on the CPU whatever the target, so every device agrees
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=cpu).float()
        inv_freq = 1.0 / (self.base ** (exponents / self.head_dim))  # [head_dim / 2]
        if self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling)
        freqs = torch.outer(torch.arange(self.max_positions, device=cpu).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos_cache = emb.cos().to(device)
        self.sin_cache = emb.sin().to(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [num_tokens]; q [num_tokens, heads, head_dim]; k [num_tokens, kv_heads, ..].
        Returns new rotated (q, k); the inputs are not modified."""
        return kernels.rotary(positions, q, k, self.cos_cache, self.sin_cache)

    def rotate_and_write_kv(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        """forward's rotation of q and k, with the rotated k and v stored in the paged caches
        [num_blocks, block_size, num_kv_heads, head_dim] at slot_mapping [num_tokens] (-1
        skipped), as an attention layer needs them. Returns the rotated q; on CUDA one launch."""
        return kernels.rotary_write_kv_cache(
            positions, q, k, v, self.cos_cache, self.sin_cache, key_cache, value_cache, slot_mapping
        )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent stretch: long wavelengths / factor, short ones kept,
    a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)
