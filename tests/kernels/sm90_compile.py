"""Compiles every Triton kernel for sm_90 (H100 / H200) ahead of time, on a machine with no GPU:
`python -m tests.kernels.sm90_compile` (TRITON_INTERPRET unset). Run by
tests/kernels/test_sm90_compile.py in a process of its own.

Each kernel is reached through its own wrapper (kernels/triton_*.py) on CPU tensors of serving's
shapes, so the launch is the one serving makes: its constexprs, configs and argument types. The
launch itself is replaced by a compile (triton.compile of the kernel for GPUTarget("cuda", 90))
with the launch's num_warps and num_stages, whose ptxas is in Triton's wheel. PDL is switched on
(use_pdl), so the programmatic-dependent-launch branches compile too; the interpreter the other
kernel tests run under never sees them, nor any error that only typing the kernel finds.
Prints one line a compiled variant; exits non-zero on the first kernel that does not compile.
The all-reduce + RMSNorm kernel is reached through its wrapper too: it takes the symmetric
buffers' addresses as a tensor, so stand-in addresses type it as serving's do.
"""

import os

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("sm90_compile: TRITON_INTERPRET=1 would interpret, not compile")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
}
compiled: list[str] = []


def _type(name: str, value) -> str:
    """The Triton type of one runtime argument of a launch."""
    if isinstance(value, torch.Tensor):
        return "*" + DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"argument {name}: no Triton type for {type(value).__name__}")


def _compile(self: JITFunction, *args, grid=None, warmup=False, **kwargs):
    """Stands for JITFunction.run: compiles this launch for TARGET instead of launching it."""
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    kwargs.pop("launch_pdl", None)
    bound = dict(zip(self.arg_names, args, strict=False)) | kwargs
    signature, constexprs = {}, {}
    for i, param in enumerate(self.params):
        value = bound.get(param.name, param.default)
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
        else:
            signature[param.name] = _type(param.name, value)
    source = ASTSource(fn=self, signature=signature, constexprs=constexprs)
    triton.compile(source, target=TARGET, options=options)
    shown = ", ".join(f"{self.params[i].name}={v}" for (i,), v in constexprs.items())
    compiled.append(f"{self.fn.__name__}({shown}) {options}")
    print(f"compiled {compiled[-1]}", flush=True)


def main() -> None:
    from kernels import (
        triton_activation,
        triton_all_reduce_rms_norm,
        triton_argmax,
        triton_copy_blocks,
        triton_decode_attention,
        triton_embedding,
        triton_gemv,
        triton_kv_cache,
        triton_prefill_attention,
        triton_rms_norm,
        triton_rotary,
        triton_rotary_kv_cache,
        triton_top_p,
    )

    JITFunction.run = _compile
    for module in (
        triton_activation,
        triton_all_reduce_rms_norm,
        triton_argmax,
        triton_decode_attention,
        triton_embedding,
        triton_gemv,
        triton_rms_norm,
        triton_rotary,
        triton_rotary_kv_cache,
    ):
        if hasattr(module, "use_pdl"):
            module.use_pdl = lambda device: True
    triton_decode_attention.num_sms = lambda device: 132  # an H100 / H200's: splits happen
    bf16, i32, i64 = torch.bfloat16, torch.int32, torch.int64
    heads, kv_heads, dim, block = 32, 8, 128, 16  # Llama-3-8B's attention, serving's pages
    cache = torch.zeros(64, block, kv_heads, dim, dtype=bf16)
    tables = torch.zeros(64, 16, dtype=i32)

    # Decode: unsplit (a batch) and split (one sequence over the card's SMs), bf16; the prefill
    # kernel in bf16 and float32 tiles.
    for num_seqs in (64, 1):
        q = torch.zeros(num_seqs, heads, dim, dtype=bf16)
        lens = torch.full((num_seqs,), 200, dtype=i32)
        triton_decode_attention.decode_attention(q, cache, cache, tables[:num_seqs], lens, 0.1)
    for dtype in (bf16, torch.float32):
        q = torch.zeros(40, heads, dim, dtype=dtype)
        kv = cache.to(dtype)
        starts = torch.tensor([0, 1, 40], dtype=i32)
        lens = torch.tensor([30, 39], dtype=i32)
        triton_prefill_attention.prefill_attention(
            q, kv, kv, tables[:2], lens, starts, 0.1, max_query_len=39
        )
    # ... and its two launches of a mixed step (the one-token sequences, then the longer ones).
    triton_prefill_attention.prefill_attention(
        q.to(bf16), cache, cache, tables[:2], lens, starts, 0.1, max_query_len=39,
        one_token_context=1 << 30,
    )  # fmt: skip
    tokens, hidden = 8, 4096
    x = torch.zeros(tokens, hidden, dtype=bf16)
    weight = torch.ones(hidden, dtype=bf16)
    triton_rms_norm.rms_norm(x, weight, 1e-5)
    triton_rms_norm.fused_add_rms_norm(x, x.clone(), weight, 1e-5)
    triton_all_reduce_rms_norm.all_reduce_add_rms_norm(
        x,
        x.clone(),
        weight,
        1e-5,
        buffer_ptrs=torch.zeros(2, dtype=i64),  # two ranks' buffers (addresses only typed)
        epochs=torch.zeros(64, dtype=i32),
        rank=0,
        slot_elems=tokens * hidden,
    )
    positions = torch.zeros(tokens, dtype=i64)
    cos = torch.zeros(8192, dim, dtype=torch.float32)
    qkv = torch.zeros(tokens, (heads + 2 * kv_heads) * dim, dtype=bf16)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    v = v.view(tokens, kv_heads, dim)
    triton_rotary.rotary(positions, q, k, cos, cos)
    slots = torch.arange(tokens, dtype=i64)
    triton_rotary_kv_cache.rotary_write_kv_cache(
        positions, q, k, v, cos, cos, cache, cache.clone(), slots
    )
    triton_kv_cache.write_kv_cache(k, v, cache, cache.clone(), slots)
    triton_copy_blocks.copy_blocks([cache], [cache.clone()], torch.tensor([[0, 1]], dtype=i64))
    triton_activation.silu_and_mul(torch.zeros(tokens, 2 * 14336, dtype=bf16))
    triton_argmax.row_max(torch.zeros(tokens, 128256, dtype=bf16))
    per_row = torch.zeros(tokens)
    triton_top_p.top_p_floor(torch.zeros(tokens, 128256), per_row, per_row, per_row, per_row.bool())
    triton_embedding.shard_embedding(
        torch.zeros(tokens, dtype=i64), torch.zeros(1000, hidden, dtype=bf16), 0
    )
    triton_gemv.gemv(
        torch.zeros(1, hidden, dtype=bf16),
        torch.zeros(4096, hidden, dtype=bf16),
        None,
        (64, 128, 4),
    )
    print(f"{len(compiled)} kernel variants compiled for sm_90")


if __name__ == "__main__":
    main()
