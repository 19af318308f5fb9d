"""`pagedserve bench latency | throughput | serve`: the step anatomy, the roofline and the
picking of decode steps on hand-built step records; `bench latency` end to end on the CPU;
`bench serve`'s load, statistics, plot and its HTTP backend against a tiny local SSE server.
(`bench serve` over gRPC against a running cluster: tests/e2e/test_bench_serve.py.)"""

import argparse
import asyncio
import json
import math
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cluster import cli
from cluster.benchmarks import serve
from cluster.benchmarks.report import (
    SAMPLING,
    copy_bandwidth,
    decode_steps,
    format_anatomy,
    format_compiled,
    format_process_cpu,
    format_roofline,
    format_timeline,
    is_decode_step,
    make_roofline,
    measure_copy_bandwidth,
    process_cpu_s,
    records_between,
    roofline_ms,
    roofline_pct,
    step_anatomy,
    triton_cache_entries,
)
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO


def _record(start, duration, worker, idle, graph, scheduled, pieces=False):
    return {
        "start": start,
        "interval_ms": duration,
        "worker_ms": worker,
        "worker_idle_ms": idle,
        "cuda_graph": graph,
        "piecewise_graph": pieces,
        "scheduled": scheduled,
        "turnaround_ms": duration / 4,
    }


# A prefill, two decode steps on graphs, a mixed step in the piecewise graphs (a decode and a
# prefill chunk), and a decode step run eagerly.
RECORDS = [
    _record(1.0, 10.0, 6.0, 1.0, False, {"a": 8}),
    _record(2.0, 4.0, 3.0, 0.5, True, {"a": 1}),
    _record(3.0, 5.0, 3.5, 0.5, True, {"a": 1, "b": 1}),
    _record(4.0, 6.0, 4.0, 1.0, False, {"a": 1, "b": 7}, pieces=True),
    _record(5.0, 4.5, 3.0, 0.25, False, {"a": 1, "b": 1}),
]


def test_decode_steps_are_those_where_every_request_computes_one_token():
    assert [is_decode_step(r) for r in RECORDS] == [False, True, True, False, True]
    assert not is_decode_step(_record(0, 1, 1, 0, False, {}))  # nothing scheduled
    assert decode_steps(RECORDS) == [RECORDS[1], RECORDS[2], RECORDS[4]]


def test_records_between_keeps_the_steps_that_started_in_the_window():
    assert records_between(RECORDS, 2.0, 4.0) == RECORDS[1:4]
    assert records_between(RECORDS, 6.0, 7.0) == []


def test_step_anatomy():
    a = step_anatomy(RECORDS)
    assert a.num_steps == 5 and a.num_decode_steps == 3
    assert a.median_step_ms == 5.0  # of 4, 4.5, 5, 6, 10
    assert a.median_decode_step_ms == 4.5  # of 4, 4.5, 5
    assert a.mean_decode_step_ms == pytest.approx(4.5)
    assert a.median_worker_ms == 3.5  # of 3, 3, 3.5, 4, 6
    assert a.median_idle_ms == 0.5  # of 0.25, 0.5, 0.5, 1, 1
    assert a.median_turnaround_ms == 1.25  # a quarter of each step here
    assert a.idle_pct == pytest.approx(10.0)
    assert a.graph_hit_decode == pytest.approx(2 / 3)
    assert a.graph_hit_all == pytest.approx(2 / 5) and a.piecewise_all == pytest.approx(1 / 5)
    assert a.decode_steps_s == pytest.approx(13.5e-3)  # 4 + 4.5 + 5 ms
    assert a.other_steps_s == pytest.approx(16e-3) and a.median_other_step_ms == 8.0  # 6, 10
    assert a.idle_s == pytest.approx(3.25e-3)
    assert a.decode_idle_s == pytest.approx(1.25e-3)  # 0.5 + 0.5 + 0.25 ms
    # A step that started a busy period (no turnaround) brings the wait for work: not counted.
    after_pause = {**RECORDS[0], "worker_idle_ms": 900.0, "turnaround_ms": 0.0}
    assert step_anatomy([after_pause, *RECORDS[1:]]).idle_s == pytest.approx(2.25e-3)
    text = "\n".join(format_anatomy(a))
    assert "5 (3 decode-only)" in text and "66.7% of decode-only steps" in text
    assert "40.0% of all steps; 20.0% of all steps in pieces" in text
    assert "(10.0% of the median step)" in text
    assert "next plan sent): 1.25 ms" in text
    assert "0.01 s decode-only, 0.02 s in the 2 others (median 8.00 ms)" in text
    assert "0.00 s of it before decode-only steps (9.3% of their time)" in text  # 1.25 / 13.5


def test_the_mean_decode_step_holds_where_intervals_alternate():
    """A launch that waits for the device: answers come in pairs, 1 ms then 9 ms apart. The
    median of the intervals reads 1 ms a token where the steps took 4.2 ms on average."""
    intervals = [1.0, 9.0, 1.0, 9.0, 1.0]
    records = [_record(float(i), ms, 4.0, 0.0, True, {"a": 1}) for i, ms in enumerate(intervals)]
    a = step_anatomy(records)
    assert a.median_decode_step_ms == 1.0
    assert a.mean_decode_step_ms == pytest.approx(4.2)


def test_step_anatomy_without_decode_steps_or_steps():
    a = step_anatomy(RECORDS[:1])
    assert a.num_decode_steps == 0
    assert a.median_decode_step_ms is None and a.graph_hit_decode is None
    assert a.mean_decode_step_ms is None
    assert a.decode_steps_s == 0.0 and step_anatomy(RECORDS[1:2]).median_other_step_ms is None
    assert step_anatomy([]) is None
    assert format_anatomy(None) == ["step anatomy (timed steps): no step records"]


def test_timeline_of_the_steps_within_the_clients_pass():
    """Overlapping steps (two in flight) count once; the gaps before, between and after count
    as no step in flight."""
    records = [
        {"start": 10.0, "duration_ms": 100.0},
        {"start": 10.05, "duration_ms": 100.0},  # overlaps the first: busy 10.0 .. 10.15
        {"start": 10.5, "duration_ms": 200.0},  # busy 10.5 .. 10.7
    ]
    line = format_timeline(records, 9.9, 11.0)
    assert line == (
        "engine steps from +0.10 s to +0.80 s of the clients' 1.10 s; "
        "no step in flight for 0.75 s of it"
    )
    assert format_timeline([], 9.9, 11.0) == "engine steps: none within the clients' 1.10 s"


def test_triton_kernels_compiled_are_counted_and_named_from_the_nodes_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    assert triton_cache_entries() is None
    assert format_compiled(None, None).endswith("no Triton cache on this node")
    cache.mkdir()
    (cache / "old").mkdir()  # compiled before: not counted
    before = triton_cache_entries()
    # One directory a compiled kernel variant, holding its metadata as <kernel>.json (and the
    # group file __grp__<kernel>.json); an entry without metadata goes by its own name.
    for entry, kernel in (("a1", "_prefill_kernel"), ("b2", "_prefill_kernel"), ("c3", "_gemv")):
        (cache / entry).mkdir()
        (cache / entry / f"{kernel}.json").write_text("{}")
        (cache / entry / f"__grp__{kernel}.json").write_text("{}")
    (cache / "d4").mkdir()
    after = triton_cache_entries()
    assert (len(before), len(after)) == (1, 5)
    assert format_compiled(before, after) == (
        "Triton kernels compiled during the timed pass (this node's cache): 4 "
        "(_gemv, _prefill_kernel x2, d4)"
    )
    assert format_compiled(after, after).endswith("(this node's cache): 0")


def test_roofline_arithmetic():
    # 1 GiB read and 1 GiB written in a median of 1 ms: 2 GiB/ms.
    assert copy_bandwidth(1 << 30, [0.002, 0.001, 0.0005]) == pytest.approx(2 * (1 << 30) / 1e-3)
    # 1 GB of weights at 4 TB/s: 0.25 ms per decode step.
    assert roofline_ms(10**9, 4e12) == pytest.approx(0.25)
    r = make_roofline("cuda (NVIDIA H200)", 10**9, 4e12)
    assert r.ms == pytest.approx(0.25)
    assert roofline_pct(r, 1.0) == pytest.approx(25.0)
    assert roofline_pct(r, None) is None
    lines = format_roofline(r, 1.0)
    assert lines[0] == "card: cuda (NVIDIA H200)"
    assert "1000.0 MB of weights per rank / 4000 GB/s" in lines[1] and "0.250 ms" in lines[1]
    assert "1.000 ms per decode step (the roofline is 25.0% of it)" in lines[2]


def test_no_roofline_without_a_cuda_card_or_a_measured_bandwidth():
    on_cpu = make_roofline("cpu", 10**9, 4e12)  # a bandwidth measured elsewhere is not the card's
    assert on_cpu.ms is None and roofline_pct(on_cpu, 1.0) is None
    assert "none applies (the card is cpu" in format_roofline(on_cpu, 1.0)[1]
    unmeasured = make_roofline("cuda (NVIDIA H200)", 10**9, None)
    assert unmeasured.ms is None
    assert "none applies" in format_roofline(unmeasured)[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's answer")
def test_no_bandwidth_is_measured_without_cuda():
    assert measure_copy_bandwidth() is None


# The embedded default config on the CPU, as the CI box runs it.
CPU_CLUSTER = [
    "-c",
    f"{REPO}/configs/local.yaml",
    "--set",
    "cluster.num_cpus=2",
    "--set",
    "cache.cpu_cache_gb=0.5",
    "--set",
    "model.device=cpu",
]


def test_process_cpu_counts_this_process_and_not_one_that_is_not_here():
    before = process_cpu_s(os.getpid())
    deadline = time.process_time() + 0.1
    while time.process_time() < deadline:  # CPU time, not wall time: passes however loaded
        pass
    # /proc counts clock ticks of 10 ms: 0.1 s spun shows as at least 0.05 s, well clear of a
    # tick's rounding (0.05 spun against 0.04 failed once: 5.23 + 0.04 > 5.27 in floats).
    assert process_cpu_s(os.getpid()) - before >= 0.05
    assert process_cpu_s(2**22 + 1) is None  # above Linux's pid limit


def test_process_cpu_line_names_each_role():
    line = format_process_cpu({"engine core": [0.973], "frontends": [0.41, 0.58, 0.5], "other": []})
    assert line.endswith(
        "engine core 97%; frontends 41%-58% (mean 50%, 3 processes); other not on this node"
    )


def test_bench_latency_on_the_cpu(capsys):
    """`pagedserve bench latency` through the CLI on the embedded default config, tiny sizes,
    every request penalized (the sampler's counts, their token in flight on the device)."""
    code = cli.main(
        [
            "bench",
            "latency",
            *CPU_CLUSTER,
            "--batch-size",
            "1",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "8",
            "--num-iters",
            "1",
            "--sampling",
            "penalized",
        ]
    )
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "card: cpu" in out
    assert "roofline: none applies" in out
    weights = re.search(r"([\d.]+) MB of weights per rank", out)
    assert weights and float(weights.group(1)) > 0  # ModelInfo's weight_bytes came through
    table = out[out.index("| batch size |") :].splitlines()
    rows = {int(cells[1]): cells for cells in (line.split("|") for line in table[2:] if line)}
    assert sorted(rows) == [1, 2]
    for cells in rows.values():
        assert float(cells[2]) > 0  # ms per output token
        assert cells[3].strip() == "none" and cells[4].strip() == "none"  # no roofline
        assert int(cells[6]) >= 7  # steps: at least the 7 decode steps of 8 output tokens


def test_each_sampling_preset_is_the_sampling_it_names():
    made = {
        name: SamplingParams(max_tokens=8, ignore_eos=True, **fields)
        for name, fields in SAMPLING.items()
    }
    assert made["greedy"].temperature == 0 and made["penalized"].temperature == 0
    assert made["random"].temperature == 1.0 and made["random"].top_p == 1.0
    assert made["seeded"].seed is not None and made["random"].seed is None
    assert made["top-p"].top_p == 0.95 and 0 < made["top-p"].temperature < 1
    penalized = made["penalized"]
    assert penalized.presence_penalty and penalized.frequency_penalty
    assert penalized.repetition_penalty > 1
    assert not made["greedy"].presence_penalty and made["greedy"].repetition_penalty == 1.0


# --- bench serve ------------------------------------------------------------------------------


def _served(sent: float, outputs: list[float], done: float, tokens: int) -> serve.RequestRecord:
    return serve.RequestRecord(sent=sent, output_times=outputs, done=done, output_tokens=tokens)


def test_summarize_times_only_the_requests_that_completed():
    records = [
        _served(0.0, [0.1, 0.3, 0.4], 0.5, 3),  # TTFT 100 ms, gaps 200 and 100 ms, e2e 500 ms
        _served(1.0, [1.3, 1.4, 1.5], 1.6, 3),  # TTFT 300 ms, gaps 100 and 100 ms, e2e 600 ms
        serve.RequestRecord(sent=2.0, error="RuntimeError: HTTP 503"),
    ]
    r = serve.summarize(records, duration_s=2.0, rate=4.0, max_concurrency=None, prompt_len=8)
    assert (r["num_requests"], r["completed"], r["failed"]) == (3, 2, 1)
    assert r["errors"] == ["RuntimeError: HTTP 503"]
    assert (r["total_input_tokens"], r["total_output_tokens"]) == (16, 6)
    assert r["request_throughput"] == 1.0 and r["output_throughput"] == 3.0
    assert r["ttft_ms"]["mean"] == pytest.approx(200) and r["ttft_ms"]["p50"] == pytest.approx(200)
    assert r["itl_ms"]["mean"] == pytest.approx(125) and r["itl_ms"]["p50"] == pytest.approx(100)
    assert r["itl_ms"]["p99"] == pytest.approx(197)  # 100, 100, 100, 200: linear between
    assert r["e2e_ms"]["p90"] == pytest.approx(590)
    inf = serve.summarize(records[2:], 1.0, math.inf, 4, 8)
    assert inf["request_rate"] == "inf" and inf["max_concurrency"] == 4
    assert inf["ttft_ms"] == {"mean": None, "p50": None, "p90": None, "p99": None}
    json.dumps(inf, allow_nan=False)  # the JSON holds no NaN or Infinity


class _FakeBackend:
    """Three outputs per request, yielding to the loop between them; counts requests in flight."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.most_in_flight = 0

    async def send(self, prompt, output_len, on_output) -> int:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        for _ in range(3):
            await asyncio.sleep(0)
            on_output()
        self.in_flight -= 1
        return 3


@pytest.mark.parametrize("max_concurrency, most", [(None, 5), (2, 2)])
def test_all_at_once_or_at_most_max_concurrency_in_flight(max_concurrency, most):
    backend = _FakeBackend()
    part = asyncio.run(serve.run_rate(backend, [[1]] * 5, 3, math.inf, max_concurrency, seed=0))
    assert backend.most_in_flight == most
    assert all(r.ok and len(r.output_times) == 3 for r in part.records) and part.end > part.start


def test_bad_serve_arguments_name_the_option():
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    for argv, option in [
        (["--request-rate", "0"], "--request-rate"),
        (["--max-concurrency", "0"], "--max-concurrency"),
        (["--output-len", "0"], "--output-len"),
        (["--clients", "0"], "--clients"),
        (["--clients", "3", "--num-prompts", "2"], "--clients 3 exceeds --num-prompts"),
        (["--clients", "3", "--max-concurrency", "2"], "--max-concurrency 2 is below --clients"),
    ]:
        with pytest.raises(ValueError, match=option):
            serve.check(parser.parse_args(["--address", "x:1", *argv]))


def test_the_plot_is_a_png(tmp_path):
    records = [_served(0.0, [0.1, 0.2], 0.3, 2)]
    runs = [serve.summarize(records, d, rate, None, 8) for d, rate in ((1.0, 1.0), (0.5, 2.0))]
    serve.plot(runs, str(tmp_path / "latency.png"))
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _OpenAIStub(BaseHTTPRequestHandler):
    """/v1/models, and /v1/completions streaming three text chunks, an empty one and a usage
    chunk as OpenAI's SSE; max_tokens 999 is refused with OpenAI's error JSON."""

    bodies: list[dict] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/metrics":  # every scrape 10 steps later: 8 in graphs, 1 in pieces
            _OpenAIStub.scrapes += 1
            steps = 10 * _OpenAIStub.scrapes
            text = (
                f"pagedserve:engine_steps_total {steps}\n"
                f"pagedserve:engine_cuda_graph_steps_total {0.8 * steps}\n"
                f"pagedserve:engine_piecewise_graph_steps_total {0.1 * steps}\n"
                f"pagedserve:engine_step_seconds_total {0.002 * steps}\n"
            )
            self._reply(200, "text/plain; version=0.0.4", text.encode())
            return
        models = {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}
        self._reply(200, "application/json", json.dumps(models).encode())

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        body["authorization"] = self.headers.get("Authorization")
        self.bodies.append(body)
        if body["max_tokens"] == 999:
            error = {
                "error": {"message": "max_tokens is too large", "type": "invalid_request_error"}
            }
            self._reply(400, "application/json", json.dumps(error).encode())
            return
        chunk = {"object": "text_completion", "model": body["model"]}
        events = [
            {**chunk, "choices": [{"index": 0, "text": t, "finish_reason": None}]}
            for t in ("Pa", "ri", "s")
        ]
        events.append({**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        events.append({**chunk, "choices": [], "usage": {"completion_tokens": 4}})
        sse = ": a comment\n\n" + "".join(f"data: {json.dumps(e)}\n\n" for e in events)
        self._reply(200, "text/event-stream", (sse + "data: [DONE]\n\n").encode())


@pytest.fixture
def openai_stub():
    _OpenAIStub.bodies = []
    _OpenAIStub.scrapes = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIStub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


def test_the_http_backend_streams_openai_sse(openai_stub):
    async def send(max_tokens: int) -> serve.RequestRecord:
        backend = serve.HttpBackend(openai_stub, vocab=256, token="sekret")
        try:
            assert await backend.setup() == 256
            return await serve.send_one(backend, [101, 102, 103], max_tokens, None)
        finally:
            await backend.close()

    record = asyncio.run(send(4))
    assert record.ok and record.output_tokens == 4  # from the usage chunk
    assert len(record.output_times) == 3  # the chunks with text
    assert record.sent <= record.output_times[0] <= record.output_times[-1] <= record.done
    body = _OpenAIStub.bodies[0]
    assert body["model"] == "stub-model"  # the first of /v1/models
    assert body["prompt"] == [101, 102, 103] and body["max_tokens"] == 4
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    assert body["authorization"] == "Bearer sekret"
    refused = asyncio.run(send(999))
    assert (
        not refused.ok
        and "HTTP 400" in refused.error
        and "max_tokens is too large" in refused.error
    )


def test_bench_serve_splits_the_requests_over_client_processes(openai_stub, tmp_path):
    """--clients 2: every request is sent once, by one of two processes started together, and
    the run counts them all, with each process's CPU share."""
    result = tmp_path / "serve.json"
    argv = ["--address", openai_stub, "--backend", "http", "--vocab-size", "256"]
    argv += ["--clients", "2", "--num-prompts", "7", "--input-len", "3", "--output-len", "4"]
    argv += ["--request-rate", "50", "inf", "--max-concurrency", "3"]
    assert serve.main([*argv, "--result-json", str(result)]) == 0
    runs = json.loads(result.read_text())["runs"]
    assert [r["request_rate"] for r in runs] == [50.0, "inf"]
    for r in runs:
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (7, 0, 7 * 4)
        assert len(r["client_cpu"]) == 2 and all(0 < c for c in r["client_cpu"])
        assert 0 < r["ttft_ms"]["p50"] <= r["e2e_ms"]["p50"]
        # One scrape before and one after each rate: the 10 steps between them.
        assert r["engine"]["steps"] == 10 and r["engine"]["graph_share"] == pytest.approx(0.8)
        assert r["engine"]["piecewise_share"] == pytest.approx(0.1)
        assert r["engine"]["mean_step_ms"] == pytest.approx(2.0)
    prompts = [tuple(body["prompt"]) for body in _OpenAIStub.bodies]
    # Seven requests a rate, each sent once (random prompts: all distinct), none lost.
    assert len(prompts) == len(set(prompts)) == 2 * 7
    assert all(len(p) == 3 for p in prompts)


def test_the_http_backend_needs_a_vocabulary_size():
    async def setup() -> int:
        backend = serve.HttpBackend("http://127.0.0.1:1")
        try:
            return await backend.setup()
        finally:
            await backend.close()

    with pytest.raises(ValueError, match="--vocab-size"):
        asyncio.run(setup())


def test_bench_throughput_on_the_cpu(capsys):
    """`pagedserve bench throughput` through the CLI, tiny sizes, two client processes (as on a
    GPU): the timed pass's steps are counted by the engines, and 4 x 3 output tokens reported."""
    code = cli.main(
        [
            "bench",
            "throughput",
            *CPU_CLUSTER,
            "--num-requests",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "3",
            "--clients",
            "2",
            "--set",
            "server.frontends=2",
        ]
    )
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    # The engines' count of the timed pass's steps agrees with the records kept (far fewer
    # than the window); each request samples 3 tokens, one a step.
    steps = re.search(
        r"timed pass: (\d+) engine steps over all replicas, mean \d+ sequences per step\n", out
    )
    assert steps and int(steps.group(1)) >= 3
    assert f"  steps: {steps.group(1)} (" in out
    assert re.search(r"\| pagedserve \| 12 \| [\d.]+ \| \d+ \|", out)
    # The server's processes are on this node: the core's share and each frontend's.
    assert re.search(
        r"server processes' CPU over the timed pass \(100% = one core\): engine core \d+%; "
        r"frontends \d+%-\d+% \(mean \d+%, 2 processes\)\n",
        out,
    )
    # Each frontend's share of the 12 tokens, its CPU, its last message of the pass and its last
    # message from the core.
    line = re.search(r"\nfrontends: (.*)\n", out)
    assert line
    parts = line.group(1).split("; ")
    assert len(parts) == 2
    shares = [
        re.match(
            r"(\d+)% of the tokens at \d+% CPU, last message "
            r"(-|\+[\d.]+ s \(its last core message \+[\d.]+ s\))$",
            p,
        )
        for p in parts
    ]
    assert all(shares) and 99 <= sum(int(m.group(1)) for m in shares) <= 101
    assert all((m.group(2) == "-") == (m.group(1) == "0") for m in shares)
    # Each client sends to the frontends' own ports in turn (AsyncClient.spread): half each.
    assert [int(m.group(1)) for m in shares] == [50, 50]
    assert re.search(
        r"engine steps from \+[\d.]+ s to \+[\d.]+ s of the clients' [\d.]+ s; "
        r"no step in flight for [\d.]+ s of it\n",
        out,
    )
    assert re.search(
        r"Triton kernels compiled during the timed pass\b.*: (\d+|no Triton cache on this node)\n",
        out,
    )
    # And the two client processes' shares (near 100%: the figure measures the client).
    assert re.search(
        r"client processes' CPU over the timed pass \(100% = one core\): "
        r"clients \d+%-\d+% \(mean \d+%, 2 processes\)\n",
        out,
    )


def test_engine_step_runs_replicas_in_one_process_and_a_process_each():
    from cluster.benchmarks import engine_step

    for processes in (False, True):
        # 2 engines x 30 steps of 4 requests each, every one finished (it raises if not).
        rate, idle = engine_step.replicas_steps_per_s(2, 4, 30, processes)
        assert rate > 0 and idle == 0.0  # an instant rank reports no idle


def test_engine_step_ranks_can_play_a_device_of_fixed_step_time():
    from cluster.benchmarks import engine_step

    # 40 steps of 20 ms each cannot take less than 0.8 s: at most 50 steps a second.
    rate, idle = engine_step.replicas_steps_per_s(1, 4, 40, False, device_ms=20.0)
    assert 25 < rate <= 50
    assert 0 <= idle < 0.5


def test_engine_step_measures_every_decode_step_after_the_warm_up():
    from cluster.benchmarks import engine_step

    steps = engine_step.WARMUP_STEPS + 20
    result = engine_step.run(running=4, steps=steps, profile=False)
    # max_tokens = steps: each step samples one token of all 4 requests (the first is the
    # prefill's, within the warm-up).
    assert result["steps"] == steps - engine_step.WARMUP_STEPS
    assert 0 < result["turnaround_ms"] < result["interval_ms"]
