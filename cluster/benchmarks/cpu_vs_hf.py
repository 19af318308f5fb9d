"""The embedded default on a CPU against plain HF transformers, side by side in one process.

    python -m cluster.benchmarks.cpu_vs_hf [--rounds 2] [--max-tokens 256] [--prompts chat|raw]

The seed's batch example: README's prompt plus cluster/demo.py's PROMPTS (4 prompts; README's
is also the demo's first, so it appears twice), each sampled with temperature 0.8 and top_p 0.95
for exactly --max-tokens tokens (EOS disabled on both sides).

- HF: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)`, one batched
  `generate` of the 4 prompts (left-padded; do_sample, top_k=0 so that HF's default top-k of 50
  is off, as it is on ours), with this process's torch threads as they come.
- pagedserve: `LLM(model="smollm2-135m-instruct").generate(...)` with
  SamplingParams(temperature=0.8, top_p=0.95, max_tokens=..., ignore_eos=True).

Both get the same token ids: with --prompts chat (the default) each prompt rendered by the
model's chat template (as `llm.chat` does, generation prompt added), passed to `LLM.generate` as
{"prompt_token_ids": ...}; with --prompts raw the plain strings, tokenized by each side (the
run checks the ids agree). Loading the models and starting the cluster are not timed: each
timing is one `generate` call. One untimed short warm-up each, then the runs alternate
(HF, ours, HF, ours, ...). Prints each run, the ratio of the medians and, last, a markdown table.
"""

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from cluster.demo import PROMPTS as DEMO_PROMPTS
from cluster.models import resolve_model

README_PROMPT = "What is the capital of France?"
PROMPTS = [README_PROMPT, *DEMO_PROMPTS]
MODEL = "smollm2-135m-instruct"
TEMPERATURE, TOP_P = 0.8, 0.95


def prompt_ids(tokenizer, how: str) -> list[list[int]]:
    if how == "chat":
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )["input_ids"]
            )
            for p in PROMPTS
        ]
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


class HF:
    def __init__(self, path: str, ids: list[list[int]]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory, name = os.path.split(path)
        self.tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        model.generation_config.eos_token_id = None  # exactly max_new_tokens
        self.model = model.eval()
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else 0
        width = max(len(p) for p in ids)  # left padding, as batched generation needs
        self.input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in ids])
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])

    def generate(self, max_tokens: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                self.input_ids,
                attention_mask=self.mask,
                do_sample=True,
                temperature=TEMPERATURE,
                top_p=TOP_P,
                top_k=0,
                max_new_tokens=max_tokens,
                eos_token_id=None,
                pad_token_id=self.pad,
            )
        wall = time.perf_counter() - start
        return wall, [out.shape[1] - self.input_ids.shape[1]] * out.shape[0]


class Ours:
    def __init__(self, inputs: list) -> None:
        from cluster import LLM

        self.llm = LLM(model=MODEL)
        self.inputs = inputs

    def generate(self, max_tokens: int) -> tuple[float, list[int]]:
        from cluster import SamplingParams

        params = SamplingParams(
            temperature=TEMPERATURE, top_p=TOP_P, max_tokens=max_tokens, ignore_eos=True
        )
        seen = {r["step_id"] for r in self.llm._cluster.step_records()}
        start = time.perf_counter()
        outputs = self.llm.generate(self.inputs, params)
        wall = time.perf_counter() - start
        steps = [r for r in self.llm._cluster.step_records() if r["step_id"] not in seen]
        self.last_steps = (
            len(steps),
            sum(r["duration_ms"] for r in steps) / 1e3,
            sum(r["worker_ms"] for r in steps) / 1e3,
        )
        return wall, [len(o.outputs[0].token_ids) for o in outputs]

    def worker_threads(self) -> list[int]:
        """torch.get_num_threads() inside each worker actor."""
        import ray

        workers = self.llm._cluster.workers()
        return ray.get([w.torch_threads.remote() for w in workers], timeout=60)


def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each side")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompts", choices=["chat", "raw"], default="chat")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="untimed run first; 0: none")
    args = parser.parse_args()

    load_before = _load()
    path = resolve_model(MODEL)
    from transformers import AutoTokenizer

    directory, name = os.path.split(path)
    ids = prompt_ids(AutoTokenizer.from_pretrained(directory, gguf_file=name), args.prompts)
    hf = HF(path, ids)
    if args.prompts == "chat":
        ours = Ours([{"prompt_token_ids": p} for p in ids])
    else:
        ours = Ours(list(PROMPTS))
        ours_ids = [o.prompt_token_ids for o in ours.llm.generate(PROMPTS)]
        if ours_ids != ids:
            print(f"warning: the two tokenizers disagree on the raw prompts: {ours_ids} / {ids}")
    hf_threads, worker_threads = torch.get_num_threads(), ours.worker_threads()
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"(1/5/15 min) before: {load_before}; torch threads: HF {hf_threads}, "
        f"pagedserve workers {worker_threads}; prompt lengths {[len(p) for p in ids]}",
        flush=True,
    )
    if args.warmup_tokens:
        hf.generate(args.warmup_tokens)
        ours.generate(args.warmup_tokens)

    runs: dict[str, list[float]] = {"HF generate": [], "pagedserve LLM.generate": []}
    total = len(PROMPTS) * args.max_tokens
    for r in range(args.rounds):
        for label, side in (("HF generate", hf), ("pagedserve LLM.generate", ours)):
            wall, lengths = side.generate(args.max_tokens)
            if lengths != [args.max_tokens] * len(PROMPTS):
                raise RuntimeError(f"{label}: generated {lengths} tokens, not {args.max_tokens}")
            runs[label].append(wall)
            detail = ""
            if side is ours:
                steps, engine_s, worker_s = ours.last_steps
                detail = (
                    f" [{steps} engine steps: {engine_s:.2f} s, of which the worker's Execute "
                    f"{worker_s:.2f} s]"
                )
            print(
                f"round {r + 1}: {label}: {wall:.2f} s ({total / wall:.1f} tokens/s){detail}; "
                f"load {_load()}",
                flush=True,
            )
    ours.llm.shutdown()

    hf_med = statistics.median(runs["HF generate"])
    ours_med = statistics.median(runs["pagedserve LLM.generate"])
    per_round = ", ".join(
        f"{o / h:.2f}x"
        for h, o in zip(runs["HF generate"], runs["pagedserve LLM.generate"], strict=True)
    )
    print(
        f"\n{len(PROMPTS)} prompts ({args.prompts}) x {args.max_tokens} tokens, temperature "
        f"{TEMPERATURE}, top_p {TOP_P}; load average after: {_load()}; ratio ours / HF per "
        f"round: {per_round}, of the medians: {ours_med / hf_med:.2f}x\n"
    )
    print("| side | runs (s) | median (s) | tokens/s | vs HF |")
    print("|---|---|---|---|---|")
    for label, walls in runs.items():
        med = statistics.median(walls)
        print(
            f"| {label} | {', '.join(f'{w:.2f}' for w in walls)} | {med:.2f} | "
            f"{total / med:.1f} | {med / hf_med:.2f}x |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
