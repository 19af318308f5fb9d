"""The checks of a config against its model that can run before any worker loads it.

The model's own config (read, not its weights: the model is built on the meta device) gives
its context length and the shape of its KV cache, so what would fail only after every worker
has loaded the model fails here in a second with a sentence naming the key:

- model.max_model_len beyond the model's context length (its max_position_embeddings: the
  rotary tables end there);
- the longest request (model.max_model_len, else the model's context) beyond the KV cache,
  where its size is known before loading: cache.num_blocks blocks, or on CPU workers the blocks
  that fit cache.cpu_cache_gb;
- cache.cpu_cache_gb or cache.swap_space_gb worth more blocks than the wire's int32 carries
  (the block counts of ProfileMemoryResponse, InitCacheRequest).
"""

import math
from dataclasses import dataclass

from cluster.config import Config
from scheduler.config import INT32_MAX

_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What the checks need of a model: its context and its KV cache's shape (one rank)."""

    max_positions: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, kv_heads: int, element_bytes: int) -> int:
        """A block's K and V over every layer, with kv_heads heads (as a rank's runner counts)."""
        return 2 * self.num_layers * kv_heads * self.head_dim * block_size * element_bytes


def model_shape(model_path: str) -> ModelShape:
    """The model's shape from its config: the model built on the meta device (no weights),
    so that every architecture reports what its workers will."""
    from worker.loader import meta_model, read_hf_config  # torch: only when a cluster starts

    model = meta_model(read_hf_config(model_path))
    num_layers, num_kv_heads, head_dim = model.kv_cache_spec()
    return ModelShape(model.max_positions, num_layers, num_kv_heads, head_dim)


def check_before_loading(config: Config, shape: ModelShape, cpu_workers: bool) -> None:
    """A ValueError naming the key when config cannot serve a model of this shape.
    cpu_workers: the workers compute on CPUs (their KV cache is cache.cpu_cache_gb)."""
    model, cache, tp = config.model, config.cache, config.parallel.tensor_parallel_size
    if model.max_model_len is not None and model.max_model_len > shape.max_positions:
        raise ValueError(
            f"model.max_model_len={model.max_model_len} exceeds the model's context length "
            f"of {shape.max_positions} tokens (its max_position_embeddings); lower it"
        )
    # Ranks hold floor or ceil of num_kv_heads / tp heads (at least 1: replicated past it).
    fewest_heads = max(1, shape.num_kv_heads // tp)
    most_heads = max(1, math.ceil(shape.num_kv_heads / tp))
    # auto: float32 on a CPU, bfloat16 on a GPU (worker.worker.resolve_dtype).
    dtype = model.dtype if model.dtype != "auto" else "float32" if cpu_workers else "bfloat16"
    smallest_block = shape.bytes_per_block(cache.block_size, fewest_heads, _ELEMENT_BYTES[dtype])
    # cpu_cache_gb too on GPU workers: it travels to them (ProfileMemory) all the same.
    for key, gb in [
        ("cache.cpu_cache_gb", cache.cpu_cache_gb),
        ("cache.swap_space_gb", cache.swap_space_gb),
    ]:
        blocks = gb * (1 << 30) / smallest_block  # a float: inf for the largest sizes
        if blocks > INT32_MAX:
            raise ValueError(
                f"{key}={gb} holds {blocks:.4g} blocks of {smallest_block} bytes of this model, "
                f"beyond the {INT32_MAX} a replica can address; lower {key}"
            )
    longest = model.max_model_len or shape.max_positions
    if cache.num_blocks is not None:
        capacity, source = cache.num_blocks, f"cache.num_blocks={cache.num_blocks}"
    elif cpu_workers:
        largest_block = shape.bytes_per_block(cache.block_size, most_heads, _ELEMENT_BYTES[dtype])
        capacity = int(cache.cpu_cache_gb * (1 << 30)) // largest_block
        source = f"cache.cpu_cache_gb={cache.cpu_cache_gb} ({capacity} blocks of this model)"
    else:  # a GPU's cache is known once the workers have profiled their memory
        return
    if longest > capacity * cache.block_size:
        which, fix = (
            ("model.max_model_len", "lower it")
            if model.max_model_len
            else ("the model's context length", "set model.max_model_len below it")
        )
        raise ValueError(
            f"{which} ({longest} tokens) does not fit the KV cache: {source} x "
            f"cache.block_size={cache.block_size} = {capacity * cache.block_size} tokens; "
            f"{fix} or give the cache more blocks"
        )
