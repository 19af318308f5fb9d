"""Online serving latency against a running server, as `vllm bench serve`.

    pagedserve bench serve --address 127.0.0.1:50051 --request-rate 2 4 8 --num-prompts 200 \
        --input-len 128 --output-len 128 [--max-concurrency 64] [--backend http] [--clients 4] \
        [--result-json results.json] [--plot latency.png]

For each request rate in turn, --num-prompts requests of --input-len random token ids are sent
with Poisson arrivals at that rate (exponential gaps; inf sends all at once), at most
--max-concurrency in flight when given; each asks for exactly --output-len tokens (greedy,
ignore_eos) and is streamed. Over gRPC (the Serving API's Generate, every step's tokens streamed)
or HTTP (--backend http: OpenAI's /v1/completions with stream=true, the token ids as `prompt`).

One Python process reads some thousands of streamed messages a second; beyond that the figures
measure the client. --clients N splits each rate's requests round-robin over N client processes
that start together, each sending its share with Poisson arrivals at rate / N (independent
Poisson arrivals add up to Poisson arrivals at the sum of their rates) and holding at most its
share of --max-concurrency; each process's CPU share is reported beside the latencies.

Per rate: time to first token (send to the first output), inter-token latency (the gaps between
a request's later outputs), end-to-end latency (send to the end), each as mean, p50, p90 and
p99 in ms, and request and output-token throughput over the rate's wall time; and what the
server's engine did meanwhile, where it tells (GetServerInfo over gRPC, /metrics over HTTP): its
steps, the share that replayed a CUDA graph, and their mean time (the server's steps for any
client, so run it alone). --result-json writes them; --plot draws the latency percentiles
against the achieved request throughput.
"""

import argparse
import asyncio
import json
import math
import multiprocessing
import random
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Protocol

import numpy as np

from cluster.benchmarks.report import run_client, run_processes
from cluster.client import AsyncClient, Credentials
from cluster.outputs import OutputCollector
from scheduler.config import split_evenly
from scheduler.sampling_params import RequestOutputKind, SamplingParams

PERCENTILES = (50, 90, 99)
MIN_TOKEN_ID = 100  # random prompts stay above the special tokens


@dataclass(frozen=True)
class EngineSteps:
    """The server's engine step counters at one moment (ServerInfoResponse's num_steps,
    num_graph_steps, num_piecewise_steps, step_seconds)."""

    steps: int
    graph_steps: int
    piecewise_steps: int
    seconds: float

    def since(self, before: "EngineSteps") -> dict:
        """The steps between before and these: their count, the shares that replayed a whole
        CUDA graph and the graphs in pieces, their mean time in ms (None without steps)."""
        steps = self.steps - before.steps

        def share(now: int, then: int) -> float | None:
            return (now - then) / steps if steps else None

        return {
            "steps": steps,
            "graph_share": share(self.graph_steps, before.graph_steps),
            "piecewise_share": share(self.piecewise_steps, before.piecewise_steps),
            "mean_step_ms": (self.seconds - before.seconds) / steps * 1e3 if steps else None,
        }


class Backend(Protocol):
    """One wire to the server."""

    async def setup(self) -> int:
        """Asks the server what the run needs, once, before any request; returns the model's
        vocabulary size (random prompt ids are drawn below it)."""
        ...

    async def send(self, prompt: list[int], output_len: int, on_output: Callable[[], None]) -> int:
        """Sends one request and streams it: on_output is called as each message bringing new
        output arrives; returns the completion's output token count. Raises on failure."""
        ...

    async def engine_steps(self) -> EngineSteps | None:
        """The server's engine step counters now; None where the server does not tell."""
        ...

    async def close(self) -> None: ...


class GrpcBackend:
    """The Serving API's Generate, every step's tokens streamed (output_kind DELTA)."""

    def __init__(self, address: str, token: str | None = None, spread: bool = True) -> None:
        """spread: Generates to the frontends' own ports in turn (AsyncClient.spread)."""
        self._client = AsyncClient(address, Credentials(token=token))
        self._spread = spread

    async def setup(self) -> int:
        if self._spread:
            await self._client.spread()
        return (await self._client.model_info()).vocab_size

    async def send(self, prompt: list[int], output_len: int, on_output: Callable[[], None]) -> int:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=output_len,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        collector = OutputCollector()
        async for msg in self._client.generate(prompt, params):
            if msg.token_ids:
                on_output()
            collector.add(msg)
        return len(collector.result().outputs[0].token_ids)

    async def engine_steps(self) -> EngineSteps | None:
        info = await self._client.server_info()
        return EngineSteps(
            info.num_steps, info.num_graph_steps, info.num_piecewise_steps, info.step_seconds
        )

    async def close(self) -> None:
        await self._client.close()


class HttpBackend:
    """OpenAI's /v1/completions, streamed (SSE), the prompt as token ids; the output token count
    from the usage chunk (stream_options.include_usage)."""

    def __init__(
        self,
        base_url: str,
        vocab: int | None = None,
        model: str | None = None,
        token: str | None = None,
    ) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None)
        self._vocab = vocab
        self._model = model

    async def setup(self) -> int:
        """The model is --model, else the first of /v1/models; the vocabulary, --vocab-size."""
        if self._vocab is None:
            raise ValueError("--vocab-size is needed with --backend http (OpenAI's API has none)")
        if self._model is None:
            reply = await self._http.get("/v1/models")
            reply.raise_for_status()
            self._model = reply.json()["data"][0]["id"]
        return self._vocab

    async def send(self, prompt: list[int], output_len: int, on_output: Callable[[], None]) -> int:
        body = {
            "model": self._model,
            "prompt": prompt,
            "max_tokens": output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        completion_tokens = None
        async with self._http.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {(await reply.aread()).decode()}")
            async for event in sse_events(reply.aiter_lines()):
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']}")
                if any(choice.get("text") for choice in event.get("choices") or ()):
                    on_output()
                if event.get("usage"):
                    completion_tokens = event["usage"]["completion_tokens"]
        if completion_tokens is None:
            raise RuntimeError("the stream ended without a usage chunk")
        return completion_tokens

    async def engine_steps(self) -> EngineSteps | None:
        """From /metrics' pagedserve:engine_* counters (None when it has none)."""
        from prometheus_client.parser import text_string_to_metric_families

        reply = await self._http.get("/metrics")
        if reply.status_code != 200:
            return None
        names = {
            "pagedserve:engine_steps_total": "steps",
            "pagedserve:engine_cuda_graph_steps_total": "graph_steps",
            "pagedserve:engine_piecewise_graph_steps_total": "piecewise_steps",
            "pagedserve:engine_step_seconds_total": "seconds",
        }
        found: dict[str, float] = {}
        try:
            for family in text_string_to_metric_families(reply.text):
                for sample in family.samples:
                    if sample.name in names:
                        found[names[sample.name]] = sample.value
        except ValueError:  # not the Prometheus text format
            return None
        if len(found) < len(names):
            return None
        return EngineSteps(
            int(found["steps"]),
            int(found["graph_steps"]),
            int(found["piecewise_steps"]),
            found["seconds"],
        )

    async def close(self) -> None:
        await self._http.aclose()


async def sse_events(lines: AsyncIterable[str]) -> AsyncIterator[dict]:
    """The JSON payloads of a server-sent event stream's `data:` lines, up to `data: [DONE]`.
    Blank lines separate events; comments (`:`) and other fields are skipped."""
    async for line in lines:
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            return
        yield json.loads(payload)


@dataclass
class RequestRecord:
    """One request as the client saw it (perf_counter seconds)."""

    sent: float
    output_times: list[float] = field(default_factory=list)  # each message with new output
    done: float | None = None
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None and bool(self.output_times)


async def send_one(
    backend: Backend, prompt: list[int], output_len: int, limit: asyncio.Semaphore | None
) -> RequestRecord:
    """One request timed from its send (after any wait for a concurrency slot)."""
    if limit is not None:
        await limit.acquire()
    record = RequestRecord(sent=time.perf_counter())
    try:
        record.output_tokens = await backend.send(
            prompt, output_len, lambda: record.output_times.append(time.perf_counter())
        )
        record.done = time.perf_counter()
    except Exception as e:  # counted as failed; the run goes on
        record.error = f"{type(e).__name__}: {e}"
    finally:
        if limit is not None:
            limit.release()
    return record


@dataclass
class ClientPart:
    """What one client process sent at one rate: its records in prompt order, when it started
    sending and when its last answer came (perf_counter: CLOCK_MONOTONIC, system-wide on Linux,
    so comparable across processes), and its CPU time meanwhile."""

    records: list[RequestRecord]
    start: float
    end: float
    cpu_s: float

    @property
    def cpu_share(self) -> float:
        """Its CPU over its wall time (1.0 = one core busy: the client is the bound)."""
        return self.cpu_s / (self.end - self.start)


async def run_rate(
    backend: Backend,
    prompts: list[list[int]],
    output_len: int,
    rate: float,
    max_concurrency: int | None,
    seed: int,
) -> ClientPart:
    """Every prompt sent on a Poisson schedule at `rate` requests/s (all at once for inf)."""
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    cpu, start = time.process_time(), time.perf_counter()
    tasks = []
    for i, prompt in enumerate(prompts):
        if i and math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(send_one(backend, prompt, output_len, limit)))
    records = list(await asyncio.gather(*tasks))
    return ClientPart(records, start, time.perf_counter(), time.process_time() - cpu)


async def _client_part(
    args: argparse.Namespace,
    prompts: list[list[int]],
    rate: float,
    max_concurrency: int | None,
    seed: int,
    ready,  # multiprocessing Barrier: every client process set up
) -> ClientPart:
    backend = make_backend(args)
    try:
        await backend.setup()
        ready.wait(timeout=120)  # nothing else runs on this loop yet: blocking is fine
        return await run_rate(backend, prompts, args.output_len, rate, max_concurrency, seed)
    finally:
        await backend.close()


def _client_process(args, prompts, rate, max_concurrency, seed, ready, results) -> None:
    run_client(_client_part(args, prompts, rate, max_concurrency, seed, ready), ready, results)


def send_in_processes(
    args: argparse.Namespace, prompts: list[list[int]], rate: float, seed: int
) -> list[ClientPart]:
    """The prompts split round-robin over args.clients processes (module docstring)."""
    n = args.clients
    limits = [None] * n if args.max_concurrency is None else split_evenly(args.max_concurrency, n)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(n)
    return run_processes(
        ctx,
        _client_process,
        [(args, prompts[i::n], rate / n, limits[i], seed + 7919 * i, ready) for i in range(n)],
        _CLIENT_TIMEOUT_S,
        "a bench serve client process",
    )


_CLIENT_TIMEOUT_S = 3600.0


def percentiles(values_s: list[float]) -> dict[str, float | None]:
    """Mean and p50 / p90 / p99 of some durations, in ms; None without any."""
    keys = ["mean", *(f"p{p}" for p in PERCENTILES)]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s) * 1e3
    values = [float(ms.mean()), *map(float, np.percentile(ms, PERCENTILES))]
    return dict(zip(keys, values, strict=True))


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    rate: float,
    max_concurrency: int | None,
    prompt_len: int,
) -> dict:
    """One rate's results, as --result-json writes them."""
    done = [r for r in records if r.ok]
    ttft = [r.output_times[0] - r.sent for r in done]
    itl = [b - a for r in done for a, b in pairwise(r.output_times)]
    e2e = [r.done - r.sent for r in done]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "max_concurrency": max_concurrency,
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error}),
        "duration_s": duration_s,
        "total_input_tokens": prompt_len * len(done),
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "ttft_ms": percentiles(ttft),
        "itl_ms": percentiles(itl),
        "e2e_ms": percentiles(e2e),
    }


def plot(runs: list[dict], path: str) -> None:
    """A PNG of the TTFT, inter-token and end-to-end latency percentiles against the achieved
    request throughput, one panel each."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    runs = sorted(runs, key=lambda r: r["request_throughput"])
    x = [r["request_throughput"] for r in runs]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    panels = (
        ("ttft_ms", "time to first token"),
        ("itl_ms", "inter-token"),
        ("e2e_ms", "end to end"),
    )
    for ax, (key, title) in zip(fig.subplots(1, 3), panels, strict=True):
        for p in PERCENTILES:
            y = [math.nan if r[key][f"p{p}"] is None else r[key][f"p{p}"] for r in runs]
            ax.plot(x, y, marker="o", label=f"p{p}")
        ax.set_title(f"{title} latency")
        ax.set_xlabel("achieved load (requests/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.savefig(path, format="png", dpi=100)


def engine_cell(engine: dict | None) -> str:
    """A rate's engine steps: their count, the shares in whole CUDA graphs and in pieces,
    their mean time."""
    if engine is None:
        return "-"
    if not engine["steps"]:
        return "0 steps"
    return (
        f"{engine['steps']} steps, {engine['graph_share']:.0%} in graphs, "
        f"{engine['piecewise_share']:.0%} in pieces, {engine['mean_step_ms']:.2f} ms each"
    )


def table(runs: list[dict]) -> list[str]:
    """A markdown table: one row per rate."""
    lines = [
        "| rate (req/s) | max concurrency | done / sent | req/s | output tok/s | "
        "TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 / p99 (ms) | E2E p50 / p90 / p99 (ms) | "
        "engine steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(stats: dict) -> str:
        return " / ".join(
            "-" if stats[f"p{p}"] is None else f"{stats[f'p{p}']:.1f}" for p in PERCENTILES
        )

    for r in runs:
        lines.append(
            f"| {r['request_rate']} | {r['max_concurrency'] or '-'} | {r['completed']} / "
            f"{r['num_requests']} | {r['request_throughput']:.2f} | "
            f"{r['output_throughput']:.1f} | {cell(r['ttft_ms'])} | {cell(r['itl_ms'])} | "
            f"{cell(r['e2e_ms'])} | {engine_cell(r.get('engine'))} |"
        )
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        required=True,
        help="the running server: gRPC host:port, or the HTTP host:port or URL with --backend http",
    )
    parser.add_argument("--backend", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--token", default=None, help="auth token, sent as a Bearer token")
    parser.add_argument(
        "--no-spread",
        dest="spread",
        action="store_false",
        help="gRPC: each client's calls on its one connection, to the frontend the kernel "
        "handed it (by default they go to the frontends' own ports in turn: AsyncClient.spread)",
    )
    parser.add_argument(
        "--model", default=None, help="HTTP: the model name (default: the first of /v1/models)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=None, help="HTTP: prompt ids are drawn below it"
    )
    parser.add_argument(
        "--request-rate",
        type=float,
        nargs="+",
        default=[math.inf],
        help="requests/s, Poisson arrivals; one or more, run in turn; inf = all at once",
    )
    parser.add_argument(
        "--max-concurrency", type=int, default=None, help="at most this many in flight"
    )
    parser.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    parser.add_argument(
        "--clients",
        type=int,
        default=1,
        help="client processes each rate's requests are split over (one reads some thousands "
        "of streamed messages a second)",
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None, metavar="PATH")
    parser.add_argument(
        "--plot", default=None, metavar="PATH", help="a PNG of latency against load"
    )


def check(args: argparse.Namespace) -> None:
    """Bad arguments get a sentence naming the option."""
    if args.num_prompts < 1 or args.input_len < 1 or args.output_len < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be >= 1")
    if any(not rate > 0 for rate in args.request_rate):
        raise ValueError(f"--request-rate must be > 0 (or inf), got {args.request_rate}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.clients < 1:
        raise ValueError(f"--clients must be >= 1, got {args.clients}")
    if args.clients > args.num_prompts:
        raise ValueError(
            f"--clients {args.clients} exceeds --num-prompts {args.num_prompts}: each client "
            "process sends at least one request"
        )
    if args.max_concurrency is not None and args.max_concurrency < args.clients:
        raise ValueError(
            f"--max-concurrency {args.max_concurrency} is below --clients {args.clients}: each "
            "client process holds its share of it, at least one"
        )


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "grpc":
        return GrpcBackend(args.address, args.token, args.spread)
    url = args.address if "://" in args.address else f"http://{args.address}"
    return HttpBackend(url, args.vocab_size, args.model, args.token)


async def bench(args: argparse.Namespace) -> dict:
    """Every rate in turn against the server; the results as --result-json writes them."""
    backend = make_backend(args)
    try:
        vocab = await backend.setup()
        runs = []
        for n, rate in enumerate(args.request_rate):
            rng = random.Random(args.seed + 1000 * n)  # other prompts each rate: no prefix hits
            prompts = [
                [rng.randrange(MIN_TOKEN_ID, vocab) for _ in range(args.input_len)]
                for _ in range(args.num_prompts)
            ]
            before = await backend.engine_steps()
            if args.clients == 1:
                parts = [
                    await run_rate(
                        backend, prompts, args.output_len, rate, args.max_concurrency, args.seed + n
                    )
                ]
            else:
                parts = await asyncio.to_thread(
                    send_in_processes, args, prompts, rate, args.seed + n
                )
            records = [r for part in parts for r in part.records]
            duration = max(p.end for p in parts) - min(p.start for p in parts)
            runs.append(summarize(records, duration, rate, args.max_concurrency, args.input_len))
            done = runs[-1]
            done["client_cpu"] = [part.cpu_share for part in parts]
            after = await backend.engine_steps()
            done["engine"] = None if before is None or after is None else after.since(before)
            print(
                f"rate {done['request_rate']}: {done['completed']} of {done['num_requests']} "
                f"requests done in {duration:.1f} s; client processes at "
                f"{min(done['client_cpu']):.0%}-{max(done['client_cpu']):.0%} of a core; "
                f"engine {engine_cell(done['engine'])}",
                flush=True,
            )
    finally:
        await backend.close()
    return {
        "backend": args.backend,
        "address": args.address,
        "num_prompts": args.num_prompts,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "runs": runs,
    }


def run(args: argparse.Namespace) -> int:
    check(args)
    results = asyncio.run(bench(args))
    print("\n" + "\n".join(table(results["runs"])))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        plot(results["runs"], args.plot)
    failed = sum(r["failed"] for r in results["runs"])
    if failed:
        errors = sorted({e for r in results["runs"] for e in r["errors"]})
        print(f"{failed} request(s) failed: {'; '.join(errors)}", file=sys.stderr)
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
