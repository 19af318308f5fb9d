"""Kernel benchmark on one GPU: `python -m kernels.benchmark [--sweep] [--only PART[,PART]]`.

Measured in one run, so every figure has its baseline from the same card:
  (a) device-to-device copy bandwidth (a large torch copy_, bytes read + written / time): the
      roofline for decode;
  (b) paged decode attention for the Llama-3-8B attention shape (32 query heads, 8 KV heads,
      head_dim 128, bf16, block_size 16): time per call and K/V bytes read per second as a % of
      the copy bandwidth, three ways (below); the torch reference on one small shape as a
      baseline; the compiled kernels' registers, spills and shared memory;
  (c) paged prefill attention of one 4k-token prompt against torch SDPA's flash backend on the
      same dense causal problem: TFLOP/s of each and the ratio;
  (d) the fused residual-add + RMSNorm kernel against the model's torch eager path;
  (e) the rotary embedding kernel (q and k in one launch) against the model's torch eager path;
  (f) a mixed step's attention: decodes beside one prompt, laid out three ways (mixed_batch):
      the prefill kernel over them all (one launch of the prompt's tiles over every sequence,
      and two launches by query length: an eager step takes one or the other by SPLIT_CONTEXT),
      the decodes and the prompt apart (the decode kernel and the prefill kernel), and one row a
      token (the decode kernel over the decodes and each prompt token, as the CUDA graphs run
      short prompts).
--sweep also times other launch configurations around the defaults, and the prefill kernel's
one launch against its two over MIXED_SWEEP (to retune the heuristics' constants; the defaults
stay shape-derived, never a per-shape table). --only (repeatable, or a
comma list of decode, prefill, norm, rotary, mixed) runs those parts only; (a) always runs.

Decode is timed three ways; the targets are judged on the third:
  plain call      triton.testing.do_bench (median), which zeroes a 256 MB buffer before every
                  call to flush the L2;
  one-call graph  do_bench of a CUDA graph holding one decode call;
  layer graph     as serving runs decode: one CUDA graph of L decode calls back to back, one per
                  layer, each reading its own KV cache (same block table and query, as a model's
                  layers share them), L large enough that the L caches hold >= 3x the card's L2
                  (and L >= 4), so every call finds its K/V out of the L2; timed with CUDA events
                  around repeated replays, no flush. Time per call = replay time / L.
Why the third: do_bench's flush leaves the L2 full of dirty lines that the kernel's reads must
write back first (traffic that is not the kernel's: about 10 us at (1, 32k) on an H100), and a
one-call graph pays a whole graph launch (4.6 us of an empty kernel's replay on an H100), which
serving pays once per step over all its layers, not once per layer. The layer graph keeps the
kernel-to-kernel gaps inside a graph, which serving does pay per layer, and one graph launch per
L calls.
Other times (copy, prefill, RMSNorm, rotary) are medians of do_bench; the copy moves 2 GiB, far
beyond the L2, so its flush hardly matters.
"""

import argparse
import functools
import statistics

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels
from kernels.paged_attention import paged_attention_ref
from kernels.rms_norm import fused_add_rms_norm_ref
from kernels.rotary import rotary_ref
from kernels.triton_decode_attention import (
    DecodeConfig,
    _decode_kernel,
    decode_attention,
    decode_config,
)
from kernels.triton_launch import cdiv, num_sms
from kernels.triton_prefill_attention import PrefillConfig, prefill_attention, prefill_config

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_SHAPES = [(1, 4096), (1, 32768), (16, 4096), (64, 1024), (64, 4096), (256, 1024)]
# Targets on an H100: (batch, context) -> min % of copy bandwidth; for (1, 4k) instead <= 15 us
# per call. Both judged on the layer graph (module docstring).
DECODE_TARGETS = {
    (1, 4096): 0.0,
    (1, 32768): 70.0,
    (16, 4096): 85.0,
    (64, 1024): 75.0,
    (64, 4096): 85.0,
    (256, 1024): 85.0,
}
PREFILL_LEN = 4096
# The layer graph: its L caches hold >= L2_MULTIPLE x the L2, and L >= MIN_LAYERS.
L2_MULTIPLE, MIN_LAYERS = 3, 4
# Events around REPLAYS back-to-back replays of the layer graph, REPEATS times; the median.
REPLAYS, REPEATS = 20, 15
RMS_NORM_TOKENS, RMS_NORM_HIDDEN, RMS_NORM_EPS = (256, 4096), 4096, 1e-5
# Rotary: Llama-3-8B's rope base and context; positions drawn at random below it.
ROTARY_TOKENS, ROTARY_BASE, ROTARY_MAX_POSITIONS = (256, 4096), 500000.0, 8192
# Mixed steps: (decodes, their context, one prompt's new tokens).
MIXED_SHAPES = [(448, 192, 128), (256, 384, 128), (64, 512, 512), (64, 512, 1024)]
# --sweep's mixed steps: the prefill kernel in one launch against two, decodes x prompt tokens.
MIXED_SWEEP = [
    (decodes, context, prompt)
    for context in (384, 2048)
    for decodes in (16, 32, 64, 128, 256, 512)
    for prompt in (128, 256, 512, 1024, 2048)
]
PARTS = ("decode", "prefill", "norm", "rotary", "mixed")


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
    key_cache, value_cache = _kv_cache(num_blocks, gen)
    # Scattered pages, as after a while of serving.
    perm = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda", generator=gen)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    return query, key_cache, value_cache, block_tables, seq_lens, query_start_loc


def _kv_cache(num_blocks: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V caches [num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM], random."""
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return (
        torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen),
        torch.randn(shape, dtype=DTYPE, device="cuda", generator=gen),
    )


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


def num_layers(kv_bytes: int, l2_bytes: int) -> int:
    """Layers L of the layer graph: L * kv_bytes >= L2_MULTIPLE * l2_bytes and L >= MIN_LAYERS.
    Then a call's K/V were last read L - 1 calls earlier, with >= 2x the L2 of other K/V read
    since: every call reads its K/V from memory, as in serving."""
    return max(MIN_LAYERS, cdiv(L2_MULTIPLE * l2_bytes, kv_bytes))


def _layer_graph_ms(inputs, context: int, layers: int, seed: int) -> float:
    """Time per call of one CUDA graph of `layers` decode calls in a row, call i on its own
    (random) KV cache; the block table, seq_lens and query are the inputs', shared as a model's
    layers share them (the query, made just before attention in serving, is hot in the L2 there
    too)."""
    query, key_cache, _, block_tables, seq_lens, query_start_loc = inputs
    gen = torch.Generator(device="cuda").manual_seed(seed)
    # The caches stay referenced (by `calls`) while the graph replays: it holds addresses only.
    calls = []
    for _ in range(layers):
        k, v = _kv_cache(key_cache.shape[0], gen)
        calls.append(_decode_fn((query, k, v, block_tables, seq_lens, query_start_loc), context))
    graph = _captured(lambda: [call() for call in calls])
    return _replay_ms(graph) / layers


def _replay_ms(graph: torch.cuda.CUDAGraph) -> float:
    """Median over REPEATS of (CUDA-event time of REPLAYS back-to-back replays) / REPLAYS."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPEATS):
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / REPLAYS)
    return statistics.median(times)


def bench_decode(bandwidth: float, sweep: bool) -> list[str]:
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    rows = [
        "| batch | context | splits | do_bench call (us) | % of copy bw | one-call graph (us) "
        "| % of copy bw | layers L | per call, L-layer graph (us) | K/V read (GB/s) "
        "| % of copy bw | target (on the layer graph) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    sms = num_sms(torch.device("cuda"))
    for batch, context in DECODE_SHAPES:
        inputs = _decode_inputs(batch, context)
        cfg = decode_config(batch, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, DTYPE, sms)
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize

        ms = _median_ms(_decode_fn(inputs, context))
        graph_ms = _median_ms(_captured(_decode_fn(inputs, context)).replay)
        layers = num_layers(kv_bytes, l2_bytes)
        layer_ms = _layer_graph_ms(inputs, context, layers, seed=batch + context)
        pct, graph_pct, layer_pct = (
            100 * kv_bytes / (t * 1e-3) / bandwidth for t in (ms, graph_ms, layer_ms)
        )
        target = DECODE_TARGETS[(batch, context)]
        goal = f">= {target:.0f}%" if target else "<= 15 us"
        ok = layer_pct >= target if target else layer_ms * 1e3 <= 15.0
        rows.append(
            f"| {batch} | {context} | {cfg.num_splits} | {ms * 1e3:.1f} | {pct:.1f} "
            f"| {graph_ms * 1e3:.1f} | {graph_pct:.1f} | {layers} | {layer_ms * 1e3:.1f} "
            f"| {kv_bytes / (layer_ms * 1e-3) / 1e9:.0f} | {layer_pct:.1f} "
            f"| {goal} {'ok' if ok else 'MISSED'} |"
        )
        if batch == 1 and context == 4096:
            # The method's floor at this launch: the same graph with every seq_len 0 (each
            # program only writes a zero row), per call.
            empty = (*inputs[:4], torch.zeros_like(inputs[4]), inputs[5])
            empty_ms = _layer_graph_ms(empty, context, layers, seed=0)
            notes.append(
                f"floor of the layer graph at (1, 4096): the same {layers}-call graph with every "
                f"seq_len 0 takes {empty_ms * 1e3:.1f} us per call"
            )
        if sweep:
            rows.extend(_sweep_decode(inputs, batch, context, kv_bytes, bandwidth, cfg))
        del inputs
        torch.cuda.empty_cache()  # the layer graphs' caches: up to 4 GiB
    rows.append("")
    rows.append(
        f"L2 {l2_bytes / 2**20:.0f} MiB; layer graph: {REPLAYS} replays, {REPEATS} times, median"
    )
    rows.extend(notes)
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


def bench_rms_norm(bandwidth: float) -> list[str]:
    """The fused residual add + RMSNorm (one Triton kernel) against the model's torch eager path
    (`x + residual`, then HF's RMSNorm: a chain of elementwise and reduction kernels), bf16."""
    hidden, eps = RMS_NORM_HIDDEN, RMS_NORM_EPS
    rows = [
        "| tokens | hidden | Triton fused (us) | % of copy bw | torch eager (us) | eager / fused "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    gen = torch.Generator(device="cuda").manual_seed(3)
    weight = (torch.randn(hidden, device="cuda", generator=gen) * 0.1 + 1).to(DTYPE)
    for tokens in RMS_NORM_TOKENS:
        x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(DTYPE)
        residual = (torch.randn(tokens, hidden, device="cuda", generator=gen) * 3).to(DTYPE)
        fused = functools.partial(kernels.fused_add_rms_norm, x, residual, weight, eps)
        eager = functools.partial(fused_add_rms_norm_ref, x, residual, weight, eps)
        fused_ms, eager_ms = _median_ms(fused), _median_ms(eager)
        # The floor's bytes: x and residual read, out and residual_out written (weight: tiny).
        moved = 4 * tokens * hidden * DTYPE.itemsize
        (out, residual_out), (expected, expected_residual) = fused(), eager()
        if not torch.equal(residual_out, expected_residual):
            raise AssertionError("fused_add_rms_norm: the residual stream differs from torch's")
        diff = (out.float() - expected.float()).abs().max().item()
        rows.append(
            f"| {tokens} | {hidden} | {fused_ms * 1e3:.1f} "
            f"| {100 * moved / (fused_ms * 1e-3) / bandwidth:.1f} | {eager_ms * 1e3:.1f} "
            f"| {eager_ms / fused_ms:.2f}x | {diff:.1e} |"
        )
    return rows


def bench_rotary(bandwidth: float) -> list[str]:
    """The Triton rotary embedding (q and k in one launch) against the model's torch eager path
    (the reference: gathers, casts, products, rotate_half's neg and cat, sums, a kernel each),
    bf16, q and k views of one merged QKV output as the model makes them."""
    rows = [
        "| tokens | Triton (us) | % of copy bw | torch eager (us) | eager / Triton "
        "| max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    # The model's float32 caches [max_positions, head_dim] (kernels.rotary's layout).
    inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    freqs = torch.outer(torch.arange(ROTARY_MAX_POSITIONS).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1).cuda()
    cos_cache, sin_cache = emb.cos(), emb.sin()
    gen = torch.Generator(device="cuda").manual_seed(4)
    q_size, kv_size = NUM_HEADS * HEAD_DIM, NUM_KV_HEADS * HEAD_DIM
    for tokens in ROTARY_TOKENS:
        qkv = torch.randn(tokens, q_size + 2 * kv_size, device="cuda", generator=gen).to(DTYPE)
        q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q, k = q.view(tokens, NUM_HEADS, HEAD_DIM), k.view(tokens, NUM_KV_HEADS, HEAD_DIM)
        positions = torch.randint(
            ROTARY_MAX_POSITIONS, (tokens,), device="cuda", generator=gen, dtype=torch.int64
        )
        fused = functools.partial(kernels.rotary, positions, q, k, cos_cache, sin_cache)
        eager = functools.partial(rotary_ref, positions, q, k, cos_cache, sin_cache)
        fused_ms, eager_ms = _median_ms(fused), _median_ms(eager)
        # The floor's bytes: q and k read and written, each token's float32 cos and sin rows read.
        moved = tokens * (2 * (NUM_HEADS + NUM_KV_HEADS) * DTYPE.itemsize + 2 * 4) * HEAD_DIM
        diff = max(
            (got.float() - expected.float()).abs().max().item()
            for got, expected in zip(fused(), eager(), strict=True)
        )
        rows.append(
            f"| {tokens} | {fused_ms * 1e3:.1f} "
            f"| {100 * moved / (fused_ms * 1e-3) / bandwidth:.1f} | {eager_ms * 1e3:.1f} "
            f"| {eager_ms / fused_ms:.2f}x | {diff:.1e} |"
        )
    return rows


def mixed_batch(
    decodes: int,
    context: int,
    prompt: int,
    device: str = "cuda",
    dtype: torch.dtype = DTYPE,
    seed: int = 0,
) -> dict[str, tuple]:
    """One layer's attention in a step of `decodes` sequences of one new token over `context`
    tokens each and one prompt of `prompt` new tokens (no cached prefix), random K/V in shuffled
    pages, as kernels.paged_attention argument tuples (its keyword bounds last):

        "one call"  every sequence in one launch: the prefill kernel, max_query_len = prompt
        "decodes"   the decode sequences alone (the decode kernel)
        "prompt"    the prompt alone (the prefill kernel)
        "rows"      one row a token: the decodes, then prompt token i as a sequence of its own
                    of i + 1 tokens over the prompt's pages (the decode kernel)

    The three layouts are one attention: "one call" == "decodes" then "prompt" == "rows"."""
    gen = torch.Generator(device=device).manual_seed(seed)
    per_decode, per_prompt = cdiv(context, BLOCK_SIZE), cdiv(prompt, BLOCK_SIZE)
    num_blocks = decodes * per_decode + per_prompt
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    value_cache = torch.randn(shape, dtype=dtype, device=device, generator=gen)
    pages = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    width = max(per_decode, per_prompt)
    tables = torch.zeros(decodes + 1, width, dtype=torch.int32, device=device)
    tables[:decodes, :per_decode] = pages[: decodes * per_decode].view(decodes, per_decode)
    tables[decodes, :per_prompt] = pages[decodes * per_decode :]
    query = torch.randn(
        decodes + prompt, NUM_HEADS, HEAD_DIM, dtype=dtype, device=device, generator=gen
    )
    scale = HEAD_DIM**-0.5

    def i32(values) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.int32, device=device)

    seq_lens = i32([context] * decodes + [prompt])
    starts = i32([*range(decodes + 1), decodes + prompt])
    one_call = (query, key_cache, value_cache, tables, seq_lens, starts, scale, prompt, context)
    alone = (query[:decodes], key_cache, value_cache, tables[:decodes], seq_lens[:decodes])
    decode_only = (*alone, i32(range(decodes + 1)), scale, 1, context)
    prompt_only = (
        query[decodes:], key_cache, value_cache, tables[decodes:], i32([prompt]),
        i32([0, prompt]), scale, prompt, prompt,
    )  # fmt: skip
    row_tables = torch.cat([tables[:decodes], tables[decodes:].expand(prompt, width)])
    row_lens = i32([context] * decodes + list(range(1, prompt + 1)))
    rows = (
        query, key_cache, value_cache, row_tables, row_lens, i32(range(decodes + prompt + 1)),
        scale, 1, max(context, prompt),
    )  # fmt: skip
    return {"one call": one_call, "decodes": decode_only, "prompt": prompt_only, "rows": rows}


def attend(args: tuple) -> torch.Tensor:
    """kernels.paged_attention over one of mixed_batch's argument tuples."""
    *tensors, scale, max_query_len, max_seq_len = args
    return kernels.paged_attention(
        *tensors, scale, max_query_len=max_query_len, max_seq_len=max_seq_len
    )


def bench_mixed(sweep: bool) -> list[str]:
    """A mixed step's attention three ways (mixed_batch), do_bench medians of one layer; with
    `sweep`, the prefill kernel's one launch against its two over MIXED_SWEEP."""
    rows = [
        "| decodes x context + prompt | prefill kernel, one launch (us) | prefill kernel, two "
        "launches by query length (us) | decode + prefill kernels (us) | one row a token (us) "
        "| max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for decodes, context, prompt in MIXED_SHAPES:
        batch = mixed_batch(decodes, context, prompt)
        *tensors, scale, _, _ = batch["one call"]
        config = prefill_config(prompt, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE)
        single = functools.partial(
            prefill_attention, *tensors, scale, max_query_len=prompt, config=config
        )
        two = functools.partial(
            prefill_attention, *tensors, scale, max_query_len=prompt, one_token_context=1 << 40
        )
        one = functools.partial(attend, batch["one call"])
        per_row = functools.partial(attend, batch["rows"])

        def split(b: dict = batch) -> tuple[torch.Tensor, torch.Tensor]:
            return attend(b["decodes"]), attend(b["prompt"])

        expected = one().float()
        diff = max(
            (single().float() - expected).abs().max().item(),
            (two().float() - expected).abs().max().item(),
            (torch.cat(split()).float() - expected).abs().max().item(),
            (per_row().float() - expected).abs().max().item(),
        )
        rows.append(
            f"| {decodes} x {context} + {prompt} | {_median_ms(single) * 1e3:.1f} "
            f"| {_median_ms(two) * 1e3:.1f} | {_median_ms(split) * 1e3:.1f} "
            f"| {_median_ms(per_row) * 1e3:.1f} | {diff:.1e} |"
        )
    if sweep:
        rows += ["", "| decodes x context + prompt | one launch (us) | two launches (us) |"]
        rows.append("|---|---|---|")
        for decodes, context, prompt in MIXED_SWEEP:
            *tensors, scale, _, _ = mixed_batch(decodes, context, prompt)["one call"]
            config = prefill_config(prompt, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE)
            single = functools.partial(
                prefill_attention, *tensors, scale, max_query_len=prompt, config=config
            )
            two = functools.partial(
                prefill_attention, *tensors, scale, max_query_len=prompt, one_token_context=1 << 40
            )
            rows.append(
                f"| {decodes} x {context} + {prompt} | {_median_ms(single) * 1e3:.1f} "
                f"| {_median_ms(two) * 1e3:.1f} |"
            )
    return rows


def _parts(value: str) -> list[str]:
    """--only's argument: a comma list of PARTS."""
    parts = [part.strip() for part in value.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{value!r}: choose from {', '.join(PARTS)}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true", help="also time other launch configs")
    parser.add_argument(
        "--only",
        action="extend",
        type=_parts,
        metavar="PART[,PART]",
        help=f"run these parts only (repeatable; of {', '.join(PARTS)}; default: all)",
    )
    args = parser.parse_args()
    parts = set(args.only or PARTS)
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
    if "decode" in parts:
        print()
        print(
            f"### Decode: {NUM_HEADS} q heads / {NUM_KV_HEADS} KV heads, head_dim {HEAD_DIM}, "
            f"bf16, block_size {BLOCK_SIZE}"
        )
        print()
        for row in bench_decode(bandwidth, args.sweep):
            print(row)
    if "prefill" in parts:
        print()
        print(f"### Prefill: one {PREFILL_LEN}-token prompt, causal, same heads, bf16")
        print()
        for row in bench_prefill(args.sweep):
            print(row)
    if "norm" in parts:
        print()
        print(f"### Residual add + RMSNorm, hidden {RMS_NORM_HIDDEN}, bf16 (do_bench medians)")
        print()
        for row in bench_rms_norm(bandwidth):
            print(row)
    if "rotary" in parts:
        print()
        print(
            f"### Rotary embedding, {NUM_HEADS} q heads / {NUM_KV_HEADS} KV heads, head_dim "
            f"{HEAD_DIM}, bf16, q/k views of one QKV output (do_bench medians)"
        )
        print()
        for row in bench_rotary(bandwidth):
            print(row)
    if "mixed" in parts:
        print()
        print(
            f"### A mixed step's attention, {NUM_HEADS} q heads / {NUM_KV_HEADS} KV heads, "
            f"head_dim {HEAD_DIM}, bf16, one layer (do_bench medians)"
        )
        print()
        for row in bench_mixed(args.sweep):
            print(row)


if __name__ == "__main__":
    main()
