"""Offline serving throughput: a fixed workload through a real cluster, and HF transformers'
batched `generate` on the same prompts and card as the baseline.

    python -m cluster.benchmarks.throughput -c configs/local.yaml --num-requests 256 \
        --input-len 128 --output-len 128 [--hf-batch 64] [--set model.dtype=bfloat16]

Every request generates exactly --output-len tokens (ignore_eos), greedy. Each completion comes
back in one message (output_kind FINAL_ONLY, as vLLM's offline LLM and its throughput
benchmark); --stream has every step's tokens streamed instead (DELTA, as a chat client). The
workload runs twice and the second pass is timed (the first compiles kernels). Prints a markdown
table: requests, tokens, wall time, output tokens per second, median time to first token (to the
first message when streamed; otherwise the server's own figure, from the last message).
"""

import argparse
import asyncio
import statistics
import sys
import time

from cluster.client import AsyncClient
from cluster.config import load_config
from cluster.launcher import Cluster
from scheduler.sampling_params import RequestOutputKind, SamplingParams


def make_prompts(num: int, input_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(num)]


async def run_workload(
    address: str, prompts: list[list[int]], output_len: int, stream: bool
) -> dict:
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    params = SamplingParams(
        temperature=0.0, max_tokens=output_len, ignore_eos=True, output_kind=kind
    )
    client = AsyncClient(address)
    ttfts: list[float] = []

    async def one(prompt: list[int]) -> int:
        start = time.perf_counter()
        n = 0
        async for delta in client.generate(prompt, params, timeout=3600):
            if stream and n == 0:
                ttfts.append(time.perf_counter() - start)
            if delta.finish_reason and not stream:
                ttfts.append(delta.timings.time_to_first_token_ms * 1e-3)
            n += len(delta.token_ids)
        return n

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(p) for p in prompts))
    wall = time.perf_counter() - start
    await client.close()
    return {
        "requests": len(prompts),
        "output_tokens": sum(counts),
        "wall_s": wall,
        "tok_per_s": sum(counts) / wall,
        "ttft_ms": statistics.median(ttfts) * 1e3,
    }


def run_hf(model_path: str, prompts: list[list[int]], output_len: int, batch: int) -> dict:
    """HF transformers' generate, batched, on the same prompts (all of one length: no padding)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if model_path.endswith(".gguf"):
        directory, name = os.path.split(model_path)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None
    kwargs = {"max_new_tokens": output_len, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        warm = torch.tensor(prompts[:1], device=device)
        model.generate(
            warm, attention_mask=torch.ones_like(warm), **{**kwargs, "max_new_tokens": 2}
        )
        start = time.perf_counter()
        tokens = 0
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i : i + batch], device=device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            tokens += out.shape[0] * (out.shape[1] - ids.shape[1])
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "wall_s": wall,
        "tok_per_s": tokens / wall,
        "ttft_ms": float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/local.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch", type=int, default=0, help="also run HF generate (0 = skip)")
    parser.add_argument(
        "--stream", action="store_true", help="stream every step's tokens (output_kind DELTA)"
    )
    args = parser.parse_args()
    config = load_config(args.config, [*args.set, "server.port=0"])
    cluster = Cluster(config)
    rows = []
    steps: list[dict] = []
    try:
        address = cluster.start()
        from cluster.client import Client

        with Client(address) as client:
            vocab = client.model_info().vocab_size
            device = client.server_info().replicas[0].workers[0].device
        prompts = make_prompts(args.num_requests, args.input_len, vocab)
        # A first pass of other random prompts (no prefix the timed pass could reuse) compiles
        # the Triton kernels for the batch shapes the workload meets; the second is timed.
        warm_up = make_prompts(args.num_requests, args.input_len, vocab, seed=1)
        asyncio.run(run_workload(address, warm_up, args.output_len, args.stream))
        since = time.monotonic()  # system-wide on Linux: comparable with the actor's records
        timed = asyncio.run(run_workload(address, prompts, args.output_len, args.stream))
        rows.append(("pagedserve (streamed)" if args.stream else "pagedserve", timed))
        steps = [r for r in cluster.step_records() if r["start"] >= since]
    finally:
        cluster.shutdown()
    if args.hf_batch:
        rows.append(
            (
                f"HF generate (batch {args.hf_batch})",
                run_hf(cluster.model_path, prompts, args.output_len, args.hf_batch),
            )
        )
    print(
        f"\nmodel {config.model.model}, device {device}, {args.num_requests} requests x "
        f"{args.input_len} prompt + {args.output_len} output tokens\n"
    )
    if steps:
        print(
            f"timed pass: {len(steps)} engine steps over all replicas, median "
            f"{statistics.median(r['duration_ms'] for r in steps):.1f} ms (the worker's "
            f"Execute: {statistics.median(r['worker_ms'] for r in steps):.1f} ms), mean "
            f"{statistics.mean(len(r['scheduled']) for r in steps):.0f} sequences per step\n"
        )
    print("| engine | output tokens | wall (s) | output tok/s | median TTFT (ms) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['output_tokens']} | {r['wall_s']:.2f} | {r['tok_per_s']:.0f} | "
            f"{r['ttft_ms']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
