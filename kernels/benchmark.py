"""Kernel benchmark on one GPU: `python -m kernels.benchmark [--sweep]`.

Measured in one run, so every figure has its baseline from the same card:
  (a) device-to-device copy bandwidth (a large torch copy_, bytes read + written / time): the
      roofline for decode;
  (b) paged decode attention for the Llama-3-8B attention shape (32 query heads, 8 KV heads,
      head_dim 128, bf16, block_size 16): median time and K/V bytes read per second as a % of
      the copy bandwidth, plain and replayed in a CUDA graph; the torch reference on one small
      shape as a baseline; the compiled kernels' registers, spills and shared memory;
  (c) paged prefill attention of one 4k-token prompt against torch SDPA's flash backend on the
      same dense causal problem: TFLOP/s of each and the ratio.
--sweep also times other launch configurations around the defaults (to retune the heuristics'
constants; the defaults stay shape-derived, never a per-shape table).
Times are medians of triton.testing.do_bench, which flushes the L2 cache before every call.
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels.paged_attention import paged_attention_ref
from kernels.triton_decode_attention import (
    DecodeConfig,
    _decode_kernel,
    decode_attention,
    decode_config,
)
from kernels.triton_launch import num_sms
from kernels.triton_prefill_attention import PrefillConfig, prefill_attention, prefill_config

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_SHAPES = [(1, 4096), (1, 32768), (16, 4096), (64, 1024), (64, 4096), (256, 1024)]
# Targets on an H100: (batch, context) -> min % of copy bandwidth (of the plain call); for
# (1, 4k) instead <= 15 us in a CUDA graph, as serving runs decode.
DECODE_TARGETS = {
    (1, 4096): 0.0,
    (1, 32768): 70.0,
    (16, 4096): 85.0,
    (64, 1024): 75.0,
    (64, 4096): 85.0,
    (256, 1024): 85.0,
}
PREFILL_LEN = 4096


def _median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (ms * 1e-3)


def _decode_inputs(batch: int, context: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen)
    value_cache = torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen)
    # Scattered pages, as after a while of serving.
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    return query, key_cache, value_cache, block_tables, seq_lens, query_start_loc


def _decode_fn(inputs, context, config=None):
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc = inputs
    scale = HEAD_DIM**-0.5
    if config is not None:
        return lambda: decode_attention(
            query, key_cache, value_cache, block_tables, seq_lens, scale, config=config
        )
    return lambda: kernels.paged_attention(
        query,
        key_cache,
        value_cache,
        block_tables,
        seq_lens,
        query_start_loc,
        scale,
        max_query_len=1,
        max_seq_len=context,
    )


def _captured(fn) -> torch.cuda.CUDAGraph:
    """fn captured in a CUDA graph, as decode runs in serving: no per-kernel launch cost."""
    fn()  # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def bench_decode(bandwidth: float, sweep: bool) -> list[str]:
    rows = [
        "| batch | context | splits | time (us) | K/V read (GB/s) | % of copy bw | target "
        "| in a CUDA graph (us) | % of copy bw |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sms = num_sms(torch.device("cuda"))
    for batch, context in DECODE_SHAPES:
        inputs = _decode_inputs(batch, context)
        cfg = decode_config(batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE, sms)
        ms = _median_ms(_decode_fn(inputs, context))
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
        pct = 100 * kv_bytes / (ms * 1e-3) / bandwidth
        target = DECODE_TARGETS[(batch, context)]
        graph_ms = _median_ms(_captured(_decode_fn(inputs, context)).replay)
        graph_pct = 100 * kv_bytes / (graph_ms * 1e-3) / bandwidth
        goal = f">= {target:.0f}%" if target else "<= 15 us in a graph"
        ok = (graph_ms * 1e3 <= 15.0) if not target else pct >= target
        rows.append(
            f"| {batch} | {context} | {cfg.num_splits} | {ms * 1e3:.1f} | "
            f"{kv_bytes / (ms * 1e-3) / 1e9:.0f} | {pct:.1f} | {goal} {'ok' if ok else 'MISSED'} "
            f"| {graph_ms * 1e3:.1f} | {graph_pct:.1f} |"
        )
        if sweep:
            rows.extend(_sweep_decode(inputs, batch, context, kv_bytes, bandwidth, cfg))
        del inputs
    # Baseline: the torch reference (one sequence at a time) on a small shape.
    batch, context = 8, 1024
    inputs = _decode_inputs(batch, context, seed=1)
    scale = HEAD_DIM**-0.5

    def reference():
        return paged_attention_ref(*inputs, scale)

    ref_ms = _median_ms(reference)
    tri_ms = _median_ms(_decode_fn(inputs, context))
    got = _decode_fn(inputs, context)()
    expected = reference()
    err = ((got.float() - expected.float()).norm() / expected.float().norm()).item()
    rows.append("")
    rows.append(
        f"torch reference at (batch {batch}, context {context}): {ref_ms * 1e3:.0f} us; "
        f"Triton {tri_ms * 1e3:.1f} us ({ref_ms / tri_ms:.0f}x); relative difference {err:.1e}"
    )
    rows.append("")
    rows.extend(_compiled_decode_kernels())
    return rows


def _compiled_decode_kernels() -> list[str]:
    """Resources of every decode kernel variant this run compiled (registers per thread, spills,
    shared memory): registers and shared memory bound the programs resident per SM."""
    rows = []
    for cache in _decode_kernel.device_caches.values():
        for kernel in cache[0].values():
            meta = kernel.metadata
            rows.append(
                f"compiled decode kernel: {kernel.n_regs} registers, {kernel.n_spills} spills, "
                f"{meta.shared} B shared memory, {meta.num_warps} warps, {meta.num_stages} stages"
            )
    return rows


def _sweep_decode(inputs, batch, context, kv_bytes, bandwidth, default) -> list[str]:
    rows, results = [], []
    for splits in sorted({1, 2, 4, 8, 16, 32, 64, default.num_splits}):
        for block_n in (32, 64, 128):
            for stages in (2, 3, 4):
                config = DecodeConfig(splits, block_n, default.num_warps, stages)
                try:
                    ms = _median_ms(_decode_fn(inputs, context, config))
                except Exception as exc:  # out of shared memory, etc.
                    rows.append(f"|   | sweep {config}: failed ({type(exc).__name__}) |")
                    continue
                results.append((ms, config))
    results.sort(key=lambda r: r[0])
    for ms, config in results[:3]:
        pct = 100 * kv_bytes / (ms * 1e-3) / bandwidth
        rows.append(f"|   | sweep best: {config} | {ms * 1e3:.1f} us | {pct:.1f}% |")
    return rows


def _prefill_inputs(seq_len: int):
    gen = torch.Generator(device="cuda").manual_seed(2)
    query = torch.randn(seq_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    key = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    value = torch.randn_like(key)
    num_blocks = seq_len // BLOCK_SIZE
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.empty(shape, dtype=DTYPE, device="cuda")
    value_cache = torch.empty(shape, dtype=DTYPE, device="cuda")
    block_table = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    pos = torch.arange(seq_len, device="cuda")
    slots = block_table[pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
    kernels.write_kv_cache(key, value, key_cache, value_cache, slots)
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device="cuda")
    query_start_loc = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
    paged = (query, key_cache, value_cache, block_table[None, :], seq_lens, query_start_loc)
    return paged, (query, key, value)


def _sdpa_flash(query, key, value):
    """torch SDPA, flash backend, on [1, heads, seq, dim]; GQA natively if this torch can."""
    q = query.transpose(0, 1)[None]
    k = key.transpose(0, 1)[None]
    v = value.transpose(0, 1)[None]

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        try:
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return lambda: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            ), "GQA"
        except RuntimeError:
            group = NUM_HEADS // NUM_KV_HEADS
            k = k.repeat_interleave(group, 1).contiguous()
            v = v.repeat_interleave(group, 1).contiguous()
            return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), "K/V repeated"


def bench_prefill(sweep: bool) -> list[str]:
    seq_len = PREFILL_LEN
    paged, dense = _prefill_inputs(seq_len)
    query, key_cache, value_cache, block_tables, seq_lens, query_start_loc = paged
    scale = HEAD_DIM**-0.5
    # Causal: seq_len * (seq_len + 1) / 2 (query, key) pairs, 2 matmuls of 2 * HEAD_DIM flops.
    flops = 4 * NUM_HEADS * HEAD_DIM * seq_len * (seq_len + 1) / 2

    def triton_fn(config=None):
        return lambda: prefill_attention(
            query,
            key_cache,
            value_cache,
            block_tables,
            seq_lens,
            query_start_loc,
            scale,
            max_query_len=seq_len,
            config=config,
        )

    ms = _median_ms(triton_fn())
    sdpa, how = _sdpa_flash(*dense)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        sdpa_ms = _median_ms(sdpa)
        expected = sdpa()[0].transpose(0, 1).float()
    got = triton_fn()().float()
    err = ((got - expected).norm() / expected.norm()).item()
    cfg = prefill_config(seq_len, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE)
    tflops, sdpa_tflops = flops / (ms * 1e-3) / 1e12, flops / (sdpa_ms * 1e-3) / 1e12
    ratio = tflops / sdpa_tflops
    rows = [
        "| prefill, one prompt | time (ms) | TFLOP/s | vs SDPA flash |",
        "|---|---|---|---|",
        f"| Triton paged ({cfg}) | {ms:.3f} | {tflops:.0f} | {ratio:.2f}x "
        f"(target >= 0.80x: {'ok' if ratio >= 0.8 else 'MISSED'}) |",
        f"| SDPA flash, dense ({how}) | {sdpa_ms:.3f} | {sdpa_tflops:.0f} | 1.00x |",
        "",
        f"relative difference Triton vs SDPA: {err:.1e}",
    ]
    if sweep:
        results = []
        for block_q in (16, 32):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        config = PrefillConfig(block_q, block_n, warps, stages)
                        try:
                            results.append((_median_ms(triton_fn(config)), config))
                        except Exception as exc:  # out of shared memory / registers
                            rows.append(f"sweep {config}: failed ({type(exc).__name__})")
        results.sort(key=lambda r: r[0])
        for sweep_ms, config in results[:5]:
            rows.append(
                f"sweep: {config}: {sweep_ms:.3f} ms, "
                f"{flops / (sweep_ms * 1e-3) / 1e12:.0f} TFLOP/s, {sdpa_ms / sweep_ms:.2f}x"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels.benchmark needs a CUDA device")
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"## Paged attention kernels on {torch.cuda.get_device_name()}")
    print()
    print(
        f"{props.multi_processor_count} SMs; torch {torch.__version__}, triton "
        f"{triton.__version__}; device-to-device copy {bandwidth / 1e12:.2f} TB/s "
        "(read + write, 1 GiB)"
    )
    print()
    print(
        f"### Decode: {NUM_HEADS} q heads / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
        f"bf16, block_size {BLOCK_SIZE}"
    )
    print()
    for row in bench_decode(bandwidth, args.sweep):
        print(row)
    print()
    print(f"### Prefill: one {PREFILL_LEN}-token prompt, causal, same heads, bf16")
    print()
    for row in bench_prefill(args.sweep):
        print(row)


if __name__ == "__main__":
    main()
