"""A frontend's cost per streamed token on the CPU: one real frontend process
(scheduler.frontend.server) in front of a real engine core (scheduler.core) whose one rank
answers every step at once, so the frontend, not a model, sets the pace.

    python -m cluster.benchmarks.frontend_stream [--clients 4] [--requests 64] [--tokens 128]
        [--tokenizer smollm2-135m-instruct] [--wire grpc|http] [--profile]

--clients processes, each with its own gRPC channel, send --requests requests each at once
(prompt token ids, greedy, ignore_eos, exactly --tokens tokens each), first with every step's
tokens streamed (output_kind DELTA), then with each completion in one message (FINAL_ONLY).
Reports for each: the output tokens and messages the clients counted, output tokens/s and
messages/s over the wall time (from the clients' common start to the last answer), and the
frontend process's CPU seconds (all its threads, /proc/PID/stat) per 1000 output tokens, and
the mean number of sequences in the engine's steps (how fast requests reach it); then the
streamed / one-message ratio of tokens/s. --profile: the frontend's event loop thread
under cProfile during the streamed pass, top 25 by cumulative time.

--wire http: the clients use the OpenAI-compatible HTTP API instead (/v1/completions, the
prompt as token ids; streamed as server-sent events with the usage chunk, or one JSON body);
a client counts the tokens from the usage and the messages as the events carrying text.

The rank samples token FIRST_TOKEN + (37 * position) % TOKEN_RANGE for every request that
samples (prompts are scheduled whole, so each scheduled request samples): ordinary tokens of
the tokenizer's vocabulary, so incremental detokenization does real work.
"""

import argparse
import asyncio
import cProfile
import functools
import io
import multiprocessing
import pstats
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import grpc

from cluster.benchmarks.modelless_rank import (
    FIRST_TOKEN,
    SEQUENCE_VOCAB_SIZE,
    TOKEN_RANGE,
    SequenceRank,
    serve_rank,
)
from cluster.benchmarks.report import process_cpu_s, run_client
from protos import serving_pb2, serving_pb2_grpc
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from scheduler.core.engine_core import EngineCore
from scheduler.core.replica import EngineConfigs, ReplicaSpec

BLOCK_SIZE = 16
PROMPT_LEN = 16
TIMEOUT_S = 600.0  # any wait of the benchmark (a pass, a process starting)


def _load_tokenizer(path: str):
    """The tokenizer, if it has every token the rank samples."""
    from scheduler.frontend.tokenizer import Tokenizer

    tokenizer = Tokenizer(path)
    if tokenizer.vocab_size < SEQUENCE_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer: {path} has {tokenizer.vocab_size} tokens, fewer than the "
            f"{SEQUENCE_VOCAB_SIZE} the rank samples from"
        )
    return tokenizer


def _serve_frontend(
    core_addresses: list[str], tokenizer_path: str, metrics_dir: str, ports: tuple[int, int], conn
) -> None:
    """A frontend as the cluster's actor runs one, on ports (0: free ones). conn: its ports out
    (or why it failed), then "profile" (start profiling its event loop), "stats" (stop and send
    the top 25), "streamed" (send FrontendServer.streamed()), "stop"."""
    from scheduler.frontend.server import FrontendServer

    sys.setswitchinterval(0.0005)  # as cluster.actors' frontends
    load = functools.partial(_load_tokenizer, tokenizer_path)
    config = ServerConfig(port=ports[0], http_port=ports[1])
    server = FrontendServer(config, core_addresses, load, "bench", metrics_dir)
    try:
        server.wait_ready(TIMEOUT_S)
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        server.stop()
        return
    conn.send((server.port, server.http_port))
    profiler = cProfile.Profile()
    while (command := conn.recv()) != "stop":
        if command == "profile":
            server.call_on_loop(profiler.enable)
        elif command == "streamed":
            conn.send(server.streamed())
        else:
            server.call_on_loop(profiler.disable)
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
            conn.send(out.getvalue())
    server.stop()


@dataclass
class FrontendProcess:
    """A frontend in a process of its own, serving (start_frontend)."""

    process: multiprocessing.process.BaseProcess
    conn: Connection  # the commands of _serve_frontend
    ports: tuple[int, int]  # gRPC, HTTP

    def profile(self) -> None:
        """Starts profiling its event loop thread."""
        self.conn.send("profile")

    def stats(self) -> str:
        """Stops profiling: the top 25 functions by cumulative time."""
        self.conn.send("stats")
        return self.conn.recv()

    def streamed(self) -> tuple[int, float | None, float | None]:
        """The output tokens it has sent its clients so far, when its last message went and
        when its last outputs came from the cores (FrontendServer.streamed)."""
        self.conn.send("streamed")
        return self.conn.recv()

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except OSError:  # it is going already
                pass
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


def start_frontends(
    ctx, count: int, core_addresses: list[str], tokenizer_path: str, metrics_dir: str
) -> list[FrontendProcess]:
    """count frontend processes of ctx, each in front of every engine core of core_addresses
    (routing its requests over them), all on the first one's free ports (gRPC, HTTP), once all
    serve; the others start together, as the cluster's frontend actors do."""

    def launch(ports: tuple[int, int]) -> FrontendProcess:
        conn, child = ctx.Pipe()
        args = (core_addresses, tokenizer_path, metrics_dir, ports, child)
        process = ctx.Process(target=_serve_frontend, args=args)
        process.start()
        return FrontendProcess(process, conn, ports)

    def serving(frontend: FrontendProcess) -> None:
        ports_or_error = None
        if frontend.conn.poll(TIMEOUT_S):
            ports_or_error = frontend.conn.recv()
        if not isinstance(ports_or_error, tuple):
            for f in frontends:
                f.stop()
            why = ports_or_error or f"it did not serve within {TIMEOUT_S} s"
            raise RuntimeError(f"a frontend failed: {why}")
        frontend.ports = ports_or_error

    frontends = [launch((0, 0))]
    serving(frontends[0])
    frontends += [launch(frontends[0].ports) for _ in range(count - 1)]
    for frontend in frontends[1:]:
        serving(frontend)
    return frontends


@dataclass
class _ClientCounts:
    tokens: int
    messages: int
    start: float  # time.monotonic(): system-wide on Linux, comparable across processes
    end: float


def _client(address: str, first: int, requests: int, tokens: int, kind: int, ready, results):
    """address: the gRPC host:port, or an http:// URL (the OpenAI-compatible API)."""
    send = _send_http if address.startswith("http://") else _send
    run_client(send(address, first, requests, tokens, kind, ready), ready, results)


def _prompt(i: int) -> list[int]:
    return [FIRST_TOKEN + (i * PROMPT_LEN + j) % TOKEN_RANGE for j in range(PROMPT_LEN)]


async def _send(address: str, first: int, requests: int, tokens: int, kind: int, ready):
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), TIMEOUT_S)
        stub = serving_pb2_grpc.ServingStub(channel)
        counts = [0, 0]  # tokens, messages

        async def one(i: int) -> None:
            msg = serving_pb2.GenerateRequest()
            msg.prompt_token_ids.ids.extend(_prompt(i))
            p = msg.params
            p.temperature, p.max_tokens, p.ignore_eos, p.output_kind = 0, tokens, True, kind
            async for response in stub.Generate(msg, timeout=TIMEOUT_S):
                counts[0] += len(response.token_ids)
                counts[1] += 1

        ready.wait(TIMEOUT_S)
        start = time.monotonic()
        await asyncio.gather(*(one(first + i) for i in range(requests)))
        return _ClientCounts(counts[0], counts[1], start, time.monotonic())


async def _send_http(url: str, first: int, requests: int, tokens: int, kind: int, ready):
    import httpx

    from cluster.benchmarks.serve import sse_events

    stream = kind == serving_pb2.DELTA
    limits = httpx.Limits(max_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT_S, limits=limits) as client:
        counts = [0, 0]  # tokens, messages

        async def one(i: int) -> None:
            body = {"model": "bench", "prompt": _prompt(i), "max_tokens": tokens}
            body.update(temperature=0.0, ignore_eos=True, stream=stream)
            if not stream:
                reply = await client.post("/v1/completions", json=body)
                reply.raise_for_status()
                counts[0] += reply.json()["usage"]["completion_tokens"]
                counts[1] += 1
                return
            body["stream_options"] = {"include_usage": True}
            async with client.stream("POST", "/v1/completions", json=body) as reply:
                reply.raise_for_status()
                async for event in sse_events(reply.aiter_lines()):
                    if any(choice.get("text") for choice in event.get("choices") or ()):
                        counts[1] += 1
                    if event.get("usage"):
                        counts[0] += event["usage"]["completion_tokens"]

        ready.wait(TIMEOUT_S)
        start = time.monotonic()
        await asyncio.gather(*(one(first + i) for i in range(requests)))
        return _ClientCounts(counts[0], counts[1], start, time.monotonic())


def _pass(ctx, address: str, pid: int, engine, clients: int, requests: int, tokens: int, kind):
    """Every client's requests at once: the counts, wall time, the frontend's CPU time and the
    mean number of sequences in the engine's steps."""
    ready, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(
            target=_client,
            args=(address, c * requests, requests, tokens, kind, ready, results),
            daemon=True,
        )
        for c in range(clients)
    ]
    for proc in procs:
        proc.start()
    try:
        try:
            ready.wait(TIMEOUT_S)
        except threading.BrokenBarrierError:  # a client failed first: its error says why
            raise RuntimeError(f"a client process failed: {results.get(timeout=10)}") from None
        cpu, steps, generated = process_cpu_s(pid), engine.num_steps, engine.num_generated_tokens
        parts = [results.get(timeout=TIMEOUT_S) for _ in procs]
        cpu, steps = process_cpu_s(pid) - cpu, engine.num_steps - steps
        generated = engine.num_generated_tokens - generated
    finally:
        for proc in procs:
            proc.join(timeout=10)
    errors = [part for part in parts if isinstance(part, str)]
    if errors:
        raise RuntimeError(f"a client process failed: {errors[0]}")
    wall = max(p.end for p in parts) - min(p.start for p in parts)
    n_tokens, n_messages = sum(p.tokens for p in parts), sum(p.messages for p in parts)
    return {
        "tokens": n_tokens,
        "messages": n_messages,
        "wall_s": wall,
        "tok_per_s": n_tokens / wall,
        "msg_per_s": n_messages / wall,
        "cpu_s_per_1k_tokens": 1000 * cpu / n_tokens,
        "seqs_per_step": generated / steps,  # every scheduled request samples a token
    }


def run(
    clients: int,
    requests: int,
    tokens: int,
    tokenizer: str,
    profile: bool = False,
    wire: str = "grpc",
) -> dict:
    """Both passes against one core and frontend, over wire ("grpc" or "http"): {"delta": ...,
    "final_only": ...,
    "ratio": streamed / one-message tokens per second, "profile": the top 25 or None}."""
    from cluster.models import resolve_tokenizer

    tokenizer_path = resolve_tokenizer(tokenizer, tokenizer, "auto")
    running = clients * requests
    max_model_len = PROMPT_LEN + tokens + 1
    configs = EngineConfigs(
        ModelConfig(max_model_len=max_model_len),
        CacheConfig(block_size=BLOCK_SIZE, num_blocks=running * (-(-max_model_len // BLOCK_SIZE))),
        SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=running * PROMPT_LEN),
    )
    ctx = multiprocessing.get_context("spawn")
    port, stop = ctx.Queue(), ctx.Event()
    rank = ctx.Process(
        target=serve_rank, args=(SequenceRank(max_model_len), port, stop), daemon=True
    )
    rank.start()
    core = frontend = None
    try:
        core = EngineCore("bench")
        core.start([ReplicaSpec((f"127.0.0.1:{port.get(timeout=TIMEOUT_S)}",), "bench")], configs)
        with tempfile.TemporaryDirectory(prefix="pagedserve-metrics-") as metrics_dir:
            (frontend,) = start_frontends(ctx, 1, [core.address], tokenizer_path, metrics_dir)
            address = f"127.0.0.1:{frontend.ports[0]}"
            if wire == "http":
                address = f"http://127.0.0.1:{frontend.ports[1]}"
            engine = core.fleet.replicas[0].engine
            args = (ctx, address, frontend.process.pid, engine, clients)
            _pass(*args, 1, 4, serving_pb2.DELTA)  # warm-up: connections, first calls
            if profile:
                frontend.profile()
            delta = _pass(*args, requests, tokens, serving_pb2.DELTA)
            top = frontend.stats() if profile else None
            final_only = _pass(*args, requests, tokens, serving_pb2.FINAL_ONLY)
    finally:
        if frontend is not None:
            frontend.stop()
        if core is not None:
            core.stop()
        stop.set()
        rank.join(timeout=10)
    ratio = delta["tok_per_s"] / final_only["tok_per_s"]
    return {"delta": delta, "final_only": final_only, "ratio": ratio, "profile": top}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--requests", type=int, default=64, help="requests per client")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request")
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--wire", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--profile", action="store_true", help="cProfile the streamed pass")
    args = parser.parse_args()
    for name in ("clients", "requests", "tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    r = run(args.clients, args.requests, args.tokens, args.tokenizer, args.profile, args.wire)
    if r["profile"] is not None:
        print(r["profile"])
    print(
        "| output | tokens | messages | wall (s) | output tok/s | messages/s "
        "| frontend CPU s / 1k tokens | sequences per step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for label, key in (("streamed (DELTA)", "delta"), ("one message (FINAL_ONLY)", "final_only")):
        p = r[key]
        print(
            f"| {label} | {p['tokens']} | {p['messages']} | {p['wall_s']:.2f} "
            f"| {p['tok_per_s']:.0f} | {p['msg_per_s']:.0f} | {p['cpu_s_per_1k_tokens']:.3f} "
            f"| {p['seqs_per_step']:.1f} |"
        )
    print(f"\nstreamed / one message: {r['ratio']:.2f}")


if __name__ == "__main__":
    main()
