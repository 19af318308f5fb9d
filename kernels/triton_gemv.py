"""One row times a weight matrix in Triton (y = x W^T + b for x [1, K]): a batch-1 decode step's
linear layers, which only stream their weights (reference: F.linear).

    W [N, K] row-major, x [K]          program p: rows p * BLOCK_N .. + BLOCK_N of W
    for k0 in 0, BLOCK_K, ...:         acc [BLOCK_N, BLOCK_K] += W tile * x chunk   (float32)
    y[rows] = sum(acc, axis=1) + b     rounded once to x's dtype

Every program streams BLOCK_N whole rows of W, so the launch has N / BLOCK_N programs and no
split over K: no partial sums to reduce afterwards (cuBLAS's batch-1 kernels for K >> N add a
split-K reduce kernel), one launch a layer. Whether it beats cuBLAS depends on the shape and the
card, so choose() times both on the weight itself, before the decode graphs are captured, and
picks the faster (for the Llama-3-8B shapes on an H200 it wins on qkv, o and down; see
BENCHMARKS.md). Sums run in another order than cuBLAS's: results agree to the last bits of the
half-precision output, not bit for bit.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.triton_pdl import pdl_enter, use_pdl

# (BLOCK_N, BLOCK_K, num_warps): the configurations choose() tries.
CONFIGS = ((4, 512, 4), (8, 512, 4), (8, 1024, 8), (16, 1024, 8))
# Taken only when faster than cuBLAS by this factor: a near tie is not worth a second path.
MIN_GAIN = 1.02
# choose() times over copies of a weight this large together: twice an H100's or H200's L2,
# and at least this many calls a graph.
COLD_BYTES = 128 << 20
MIN_CALLS = 16


@triton.jit
def _gemv_kernel(
    x_ptr,  # [K], unit stride
    w_ptr,  # [N, K], unit last stride
    b_ptr,  # [N] or a dummy when not HAS_BIAS
    y_ptr,  # [N], x's dtype
    N,
    K,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (triton_pdl)
):
    pdl_enter(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # [BLOCK_N, 1]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
        col_mask = cols < K
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: tuple[int, int, int],
) -> torch.Tensor:
    """x [1, K] times weight [N, K]^T plus bias [N]: a new [1, N] tensor of x's dtype.
    config: (BLOCK_N, BLOCK_K, num_warps), one of CONFIGS."""
    n, k = weight.shape
    if x.shape != (1, k) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"gemv: x {tuple(x.shape)}, bias {None if bias is None else tuple(bias.shape)} do "
            f"not fit weight {tuple(weight.shape)} (one row of x)"
        )
    if weight.stride(1) != 1:
        raise ValueError("gemv: the weight's input dimension must be contiguous")
    x = x.contiguous()
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config
    pdl = use_pdl(x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        x if bias is None else bias,
        y,
        n,
        k,
        weight.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        PDL=pdl,
        launch_pdl=pdl,
    )
    return y


def choose(weight: torch.Tensor, rounds: int = 5) -> tuple[int, int, int] | None:
    """The fastest of CONFIGS for one row times this (CUDA, half-precision) weight, or None when
    cuBLAS (F.linear) is as fast (within MIN_GAIN). Each is timed as a decode graph runs it: a
    CUDA graph of at least MIN_CALLS calls, over copies of the weight that together exceed the
    L2 cache (COLD_BYTES), as a decode step meets each layer's weights cold; the median of
    `rounds` replays. (Timed eagerly, a kernel of ~10 us measures the host's launch, where
    Triton's costs more than cuBLAS's.) Must run outside graph capture; takes COLD_BYTES of
    device memory for the while."""
    copies = [weight] + [weight.clone() for _ in range(COLD_BYTES // _nbytes(weight))]
    calls = copies * -(-MIN_CALLS // len(copies))
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)

    def timed(one) -> float:
        one(weight)  # compiles a Triton config on its first call
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for w in calls:
                one(w)
        graph.replay()
        times = []
        for _ in range(rounds):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    best, best_ms = None, timed(lambda w: F.linear(x, w)) / MIN_GAIN
    for config in CONFIGS:
        ms = timed(lambda w, config=config: gemv(x, w, None, config))
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
