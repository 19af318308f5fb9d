"""Prometheus metrics: what Metrics.track observes from a response stream, the sum over frontend
processes sharing a multiprocess directory, and the engine-core state read from server_info."""

import asyncio
import multiprocessing

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from protos import serving_pb2
from scheduler.frontend import metrics as metrics_module
from scheduler.frontend.metrics import FLUSH_S, INTER_TOKEN_BUCKETS, Metrics
from tests.scheduler.frontend.scripted_backend import HOLD, MODEL, ScriptedBackend, delta, last

WAIT_S = 30.0


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The metrics' time.monotonic(), set by the test: clock[0], from 1000.0."""
    now = [1000.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    monkeypatch.setattr(metrics_module, "time", Clock)
    return now


def scrape(metrics: Metrics, info: serving_pb2.ServerInfoResponse | None = None) -> dict:
    """Every sample of a scrape, by name and labels other than model_name."""
    samples = {}
    for family in text_string_to_metric_families(metrics.render(info).decode()):
        for s in family.samples:
            assert s.labels.pop("model_name") == MODEL
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def request(n: int = 1) -> serving_pb2.GenerateRequest:
    return serving_pb2.GenerateRequest(prompt="hi", params=serving_pb2.SamplingParams(n=n))


async def drain(metrics: Metrics, backend: ScriptedBackend, msg: serving_pb2.GenerateRequest):
    return [r async for r in metrics.track(msg, backend.generate(msg))]


def test_track_observes_each_completion_and_passes_the_stream_through(tmp_path):
    metrics = Metrics(MODEL, str(tmp_path))
    script = [
        delta(0, [1], "a"),
        delta(1, [5, 6], "bc"),
        delta(0, [2, 3], "de"),
        delta(0, [], ""),  # no tokens: no latency observed
        last(0, [4], "f", completion_tokens=4, prompt_tokens=7, queue_ms=250.0),
        last(1, [], "", finish_reason="length", completion_tokens=2, prompt_tokens=7),
    ]
    backend = ScriptedBackend(lambda r: script)
    assert asyncio.run(drain(metrics, backend, request(n=2))) == script
    s = scrape(metrics)
    assert s[("pagedserve:time_to_first_token_seconds_count", ())] == 2
    # Completion 0 had 3 tokens after its first, completion 1 none.
    assert s[("pagedserve:inter_token_latency_seconds_count", ())] == 3
    assert s[("pagedserve:e2e_request_latency_seconds_count", ())] == 2
    queue_buckets = {
        dict(labels)["le"]: v
        for (name, labels), v in s.items()
        if name == "pagedserve:request_queue_time_seconds_bucket"
    }
    assert (queue_buckets["0.3"], queue_buckets["+Inf"]) == (2, 2)
    assert s[("pagedserve:request_queue_time_seconds_sum", ())] == pytest.approx(0.25)
    assert s[("pagedserve:generation_tokens_total", ())] == 6
    assert s[("pagedserve:prompt_tokens_total", ())] == 7  # once per request
    success = "pagedserve:request_success_total"
    assert s[(success, (("finished_reason", "stop"),))] == 1
    assert s[(success, (("finished_reason", "length"),))] == 1
    assert s[(success, (("finished_reason", "abort"),))] == 0


def test_a_completion_sent_in_one_message_takes_its_latencies_from_the_core(tmp_path):
    metrics = Metrics(MODEL, str(tmp_path))
    msg = request()
    msg.params.output_kind = serving_pb2.FINAL_ONLY
    script = [last(0, [1, 2, 3, 4], "abcd", completion_tokens=4, ttft_ms=100.0, total_ms=400.0)]
    asyncio.run(drain(metrics, ScriptedBackend(lambda r: script), msg))
    s = scrape(metrics)
    assert s[("pagedserve:time_to_first_token_seconds_count", ())] == 1
    assert s[("pagedserve:time_to_first_token_seconds_sum", ())] == pytest.approx(0.1)
    assert s[("pagedserve:inter_token_latency_seconds_count", ())] == 3
    assert s[("pagedserve:inter_token_latency_seconds_sum", ())] == pytest.approx(0.3)
    assert s[("pagedserve:generation_tokens_total", ())] == 4


def test_a_stream_closed_early_counts_its_unfinished_completions_aborted(tmp_path):
    metrics = Metrics(MODEL, str(tmp_path))
    backend = ScriptedBackend(lambda r: [last(0, [1], "a"), delta(1, [2], "b"), HOLD])

    async def take_two():
        stream = metrics.track(request(n=3), backend.generate(request(n=3)))
        await anext(stream)
        await anext(stream)
        await stream.aclose()

    asyncio.run(take_two())
    assert backend.closed.is_set()
    s = scrape(metrics)
    success = "pagedserve:request_success_total"
    assert s[(success, (("finished_reason", "stop"),))] == 1
    assert s[(success, (("finished_reason", "abort"),))] == 2


def serve_requests(multiproc_dir: str, num_requests: int) -> None:
    """A frontend process: tracks num_requests streams of one token each."""
    metrics = Metrics(MODEL, multiproc_dir)
    backend = ScriptedBackend()
    for _ in range(num_requests):
        asyncio.run(drain(metrics, backend, request()))


def test_a_scrape_sums_every_frontend_process(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    frontends = [spawn.Process(target=serve_requests, args=(str(tmp_path), k)) for k in (2, 3)]
    for frontend in frontends:
        frontend.start()
    for frontend in frontends:
        frontend.join(WAIT_S)
        assert frontend.exitcode == 0
    metrics = Metrics(MODEL, str(tmp_path))  # this process scrapes, and serves one more
    asyncio.run(drain(metrics, ScriptedBackend(), request()))
    s = scrape(metrics)
    assert s[("pagedserve:time_to_first_token_seconds_count", ())] == 6
    assert s[("pagedserve:request_success_total", (("finished_reason", "stop"),))] == 6


def test_the_core_state_comes_from_server_info(tmp_path):
    metrics = Metrics(MODEL, str(tmp_path))
    replicas = [
        serving_pb2.ReplicaInfo(
            num_blocks=100,
            kv_usage=0.5,
            num_running=3,
            num_waiting=1,
            num_swapped=2,
            prefix_cache_queries=40,
            prefix_cache_hits=10,
            num_preemptions=1,
        ),
        serving_pb2.ReplicaInfo(
            num_blocks=300,
            kv_usage=0.1,
            num_running=4,
            num_waiting=0,
            prefix_cache_queries=60,
            prefix_cache_hits=20,
            num_preemptions=2,
        ),
    ]
    info = serving_pb2.ServerInfoResponse(
        replicas=replicas,
        num_steps=50,
        num_graph_steps=45,
        num_piecewise_steps=3,
        step_seconds=0.25,
    )
    s = scrape(metrics, info)
    assert s[("pagedserve:num_requests_running", ())] == 7
    assert s[("pagedserve:num_requests_waiting", ())] == 1
    assert s[("pagedserve:num_requests_swapped", ())] == 2
    assert s[("pagedserve:kv_cache_usage_perc", ())] == pytest.approx((50 + 30) / 400)
    assert s[("pagedserve:prefix_cache_queries_total", ())] == 100
    assert s[("pagedserve:prefix_cache_hits_total", ())] == 30
    assert s[("pagedserve:num_preemptions_total", ())] == 3
    assert s[("pagedserve:engine_steps_total", ())] == 50
    assert s[("pagedserve:engine_cuda_graph_steps_total", ())] == 45
    assert s[("pagedserve:engine_piecewise_graph_steps_total", ())] == 3
    assert s[("pagedserve:engine_step_seconds_total", ())] == 0.25
    assert ("pagedserve:num_requests_running", ()) not in scrape(metrics)


def files_only(multiproc_dir: str) -> dict:
    """What another frontend's scrape sees: the files alone (render() also flushes its own)."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=multiproc_dir)
    return {
        (s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def test_inter_token_latencies_land_in_the_buckets_observe_would_choose(tmp_path):
    metrics = Metrics(MODEL, str(tmp_path))
    # (span, tokens): on a bound (le: counted there), between bounds, past the last (+Inf),
    # one span spread over 4 tokens (4 x 0.05: on the 0.05 bound).
    for span, tokens in ((0.01, 1), (0.011, 1), (100.0, 1), (0.2, 4), (0.0, 1)):
        metrics._inter_token(span, tokens)
    metrics._inter_token(5.0, 0)  # no tokens: nothing observed
    s = scrape(metrics)
    cumulative = {
        dict(labels)["le"]: v
        for (name, labels), v in s.items()
        if name == "pagedserve:inter_token_latency_seconds_bucket"
    }
    expected = {0.01: 2, 0.025: 3, 0.05: 7, 80.0: 7}
    for bound, count in expected.items():
        assert cumulative[str(bound)] == count, bound
    assert cumulative["+Inf"] == 8
    assert s[("pagedserve:inter_token_latency_seconds_count", ())] == 8
    assert s[("pagedserve:inter_token_latency_seconds_sum", ())] == pytest.approx(100.221)
    assert len(cumulative) == len(INTER_TOKEN_BUCKETS) + 1


def test_per_token_metrics_reach_the_files_at_a_request_end_or_after_flush_s(tmp_path, clock):
    metrics = Metrics(MODEL, str(tmp_path))
    backend = ScriptedBackend(lambda r: [delta(0, [1], "a"), delta(0, [2, 3], "b"), HOLD])
    tokens = ("pagedserve:generation_tokens_total", ())

    async def read():
        stream = metrics.track(request(), backend.generate(request()))
        await anext(stream)
        assert files_only(str(tmp_path)).get(tokens, 0) == 0  # pending: written later
        clock[0] += FLUSH_S
        await anext(stream)  # this message comes FLUSH_S after the last write: both written
        assert files_only(str(tmp_path))[tokens] == 3
        await stream.aclose()

    asyncio.run(read())
    assert files_only(str(tmp_path))[tokens] == 3


def test_streamed_counts_this_processs_tokens_written_or_pending_and_its_last_message(
    tmp_path, clock
):
    metrics = Metrics(MODEL, str(tmp_path))
    assert metrics.streamed() == (0, None)
    backend = ScriptedBackend(lambda r: [delta(0, [1], "a"), delta(0, [2, 3], "b"), HOLD])

    async def read():
        stream = metrics.track(request(), backend.generate(request()))
        clock[0] += 1.0
        await anext(stream)
        assert metrics.streamed() == (1, 1001.0)  # pending, not yet in the files
        clock[0] += FLUSH_S
        await anext(stream)  # written now
        assert metrics.streamed() == (3, 1001.0 + FLUSH_S)
        await stream.aclose()

    asyncio.run(read())
    assert metrics.streamed() == (3, 1001.0 + FLUSH_S)


def test_metrics_needs_an_existing_directory(tmp_path):
    with pytest.raises(ValueError, match="no such directory"):
        Metrics(MODEL, str(tmp_path / "missing"))
