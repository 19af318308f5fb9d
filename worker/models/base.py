"""What every model offers the model runner, and the shared weight-loading loop."""

from collections.abc import Iterable

import torch
from torch import nn

from worker.layers.attention import AttentionMetadata, PagedAttention
from worker.layers.embedding import ParallelLMHead


class CausalLM(nn.Module):
    """A decoder-only model over the paged KV cache; activations flat over the batch.

    Subclasses build their layers from an HF config dict, and name parameters like the HF
    checkpoint except where `packed` merges several checkpoint tensors into one parameter.
    """

    # checkpoint name fragment -> (parameter name fragment, shard id) for merged parameters
    packed: dict[str, tuple[str, int | str]] = {}
    # parameters that are views of others (tied embeddings): never loaded on their own
    tied: tuple[str, ...] = ()
    vocab_size: int
    max_positions: int  # the longest context the model supports
    lm_head: ParallelLMHead  # logits: local to a rank, gathered, or their greedy argmax

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> final hidden states [num_tokens, hidden]."""
        raise NotImplementedError

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [num_rows, hidden] -> float32 logits [num_rows, vocab] on rank 0, else None."""
        return self.lm_head.compute_logits(hidden)

    def checkpoint_name(self, name: str) -> str | None:
        """Maps a checkpoint tensor's name to this model's naming (None = not a weight)."""
        return name

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def kv_cache_spec(self) -> tuple[int, int, int]:
        """(num_layers, kv_heads on this rank, head_dim) of the paged KV cache."""
        attn = self.attention_layers()
        return len(attn), attn[0].num_kv_heads, attn[0].head_dim

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads this rank's shard of every parameter; any parameter left unloaded is an error."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: dict[str, set[int | str | None]] = {}
        for ckpt_name, tensor in weights:
            name = self.checkpoint_name(ckpt_name)
            if name is None:
                continue
            shard_id = None
            for fragment, (param_fragment, sid) in self.packed.items():
                if fragment in name:
                    name, shard_id = name.replace(fragment, param_fragment), sid
                    break
            if name not in params:
                raise ValueError(f"checkpoint tensor {ckpt_name} has no parameter in the model")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            with torch.no_grad():
                if loader is not None:
                    loader(param, tensor.to(param.dtype), shard_id)
                elif param.shape != tensor.shape:
                    raise ValueError(
                        f"{ckpt_name}: checkpoint shape {tuple(tensor.shape)}, model {param.shape}"
                    )
                else:
                    param.copy_(tensor)
            loaded.setdefault(name, set()).add(shard_id)
        shards: dict[str, set[int | str | None]] = {}  # parameter fragment -> its parts
        for param_fragment, sid in self.packed.values():
            shards.setdefault(param_fragment, set()).add(sid)
        missing = [
            n
            for n in params
            if n not in self.tied
            and not next((s for f, s in shards.items() if f in n), {None}) <= loaded.get(n, set())
        ]
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:5]} ({len(missing)} in all)")
