"""Prometheus metrics of a server, under vLLM's names with a `pagedserve:` prefix and vLLM's
buckets (so `vllm:time_to_first_token_seconds` is `pagedserve:time_to_first_token_seconds`).

Two sources, so that a scrape of any frontend shows the whole server:
- Request metrics (latency histograms, token and finished-request counters) are observed by each
  frontend from its response streams (Metrics.track, which both the gRPC and the HTTP side wrap
  around Backend.generate) and kept in prometheus_client's multiprocess mode: every frontend
  process of a server writes its own files into one shared directory, and a scrape sums them all.
- Engine-core state (running / waiting requests, KV cache usage, prefix cache queries and hits,
  preemptions; engine steps, those that replayed a CUDA graph and their time, names of
  pagedserve's own) is read from Backend.server_info() at scrape time, summed over replicas.

The multiprocess directory: the launcher makes one fresh, empty directory per server on the
node its frontends run on (e.g. tempfile.mkdtemp(prefix="pagedserve-metrics-")), hands it to
every frontend, and removes it when the server stops. Files of a frontend that died stay in it,
so its counts stay in the sums (counters never go back); a directory reused across servers
would add the old server's counts, hence a fresh one each time. Multiprocess mode is a property
of a whole process in prometheus_client: make one Metrics per process, before any other
prometheus_client metric.
"""

import asyncio
import bisect
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from protos import serving_pb2

PREFIX = "pagedserve:"
CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), in seconds.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort")  # serving.proto's GenerateResponse.finish_reason
# The per-token metrics (generation tokens, inter-token latency) are summed in the process and
# written to its files when a request ends, on a scrape of this process, or when a message comes
# this long after the last write: each write is a locked mmap store, three a token otherwise.
FLUSH_S = 0.25


class Metrics:
    """One frontend process's request metrics, shared with the other frontends of its server
    through multiproc_dir (an existing directory; see the module's docstring)."""

    def __init__(self, model_name: str, multiproc_dir: str) -> None:
        if not os.path.isdir(multiproc_dir):
            raise ValueError(f"metrics: no such directory {multiproc_dir!r}")
        self.model_name = model_name
        self.multiproc_dir = multiproc_dir
        # Every metric value made from here on lives in a file of this process in
        # multiproc_dir; all are made below, before returning (children included).
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
        values.ValueClass = values.MultiProcessValue()
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=None).labels(
                model_name
            )

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=None).labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            INTER_TOKEN_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = counter("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "generation_tokens", "Number of generation tokens processed."
        )
        success = Counter(
            PREFIX + "request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=None,
        )
        self._request_success = success
        self.request_success = {r: success.labels(model_name, r) for r in FINISH_REASONS}
        # Not yet written (see FLUSH_S): generation tokens; inter-token latencies per bucket
        # (the histogram's upper bounds, +Inf last) and their sum.
        self._itl_bounds = list(self.inter_token_latency._upper_bounds)
        self._pending_tokens = 0
        self._pending_itl = [0] * len(self._itl_bounds)
        self._pending_itl_sum = 0.0
        self._flushed_at = time.monotonic()
        self._last_sent_at: float | None = None  # time.monotonic() of this process's last message

    def track(
        self,
        request: serving_pb2.GenerateRequest,
        stream: AsyncIterator[serving_pb2.GenerateResponse],
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        """stream (Backend.generate(request)), passed through unchanged while observed; the clock
        starts now. Each completion (the n of a request, as vLLM counts them) is a request here:
        time to first token (its first message with tokens), inter-token latency (the gap before
        each later message with tokens, spread evenly over its tokens), end-to-end latency (to
        its last message), queue time (its last message's timings) and its finish reason
        ("abort" when the consumer closes the stream first). With output_kind FINAL_ONLY, whose
        one message comes at the end, time to first token and inter-token latency (the mean of
        the completion's) come from that message's timings, taken in the core. Prompt tokens
        count once per request. Closing the returned iterator closes stream."""
        return self._track(request, stream, time.monotonic())

    async def _track(
        self,
        request: serving_pb2.GenerateRequest,
        stream: AsyncIterator[serving_pb2.GenerateResponse],
        start: float,
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        n = request.params.n if request.params.HasField("n") else 1
        # One message per completion, at its end: its latencies are the core's timings.
        final_only = request.params.output_kind == serving_pb2.FINAL_ONLY
        last_token_at: dict[int, float] = {}  # completion index -> when its last tokens came
        finished = 0
        try:
            async with contextlib.aclosing(stream):
                async for msg in stream:
                    now = self._last_sent_at = time.monotonic()
                    self._pending_tokens += len(msg.token_ids)
                    if msg.token_ids and not final_only:
                        previous = last_token_at.get(msg.index)
                        if previous is None:
                            self.time_to_first_token.observe(now - start)
                        else:
                            self._inter_token(now - previous, len(msg.token_ids))
                        last_token_at[msg.index] = now
                    if msg.finish_reason:
                        if final_only and msg.usage.completion_tokens:
                            self._observe_core_timings(msg)
                        if not finished:
                            self.prompt_tokens.inc(msg.usage.prompt_tokens)
                        finished += 1
                        self.e2e_request_latency.observe(now - start)
                        self.request_queue_time.observe(msg.timings.queue_ms / 1000)
                        self._finished(msg.finish_reason).inc()
                    if msg.finish_reason or now - self._flushed_at >= FLUSH_S:
                        self.flush()
                    yield msg
        except (GeneratorExit, asyncio.CancelledError):  # the consumer went away: aborted
            if finished < n:
                self._finished("abort").inc(n - finished)
            raise
        finally:
            self.flush()

    def _observe_core_timings(self, msg: serving_pb2.GenerateResponse) -> None:
        """The latencies of a completion sent in one message, from the core's timings."""
        timings = msg.timings
        self.time_to_first_token.observe(timings.time_to_first_token_ms / 1000)
        decode_s = (timings.total_ms - timings.time_to_first_token_ms) / 1000
        self._inter_token(decode_s, msg.usage.completion_tokens - 1)

    def _inter_token(self, span: float, num_tokens: int) -> None:
        """num_tokens tokens that came span seconds after the one before them: num_tokens
        observations of span / num_tokens, pending until the next flush."""
        if num_tokens > 0:
            # The first bucket whose upper bound is >= the value, as Histogram.observe's.
            bucket = bisect.bisect_left(self._itl_bounds, span / num_tokens)
            self._pending_itl[bucket] += num_tokens
            self._pending_itl_sum += span

    def streamed(self) -> tuple[int, float | None]:
        """This process's output tokens sent so far (written to its files or pending) and when
        its last message went (time.monotonic(), None before any): what benchmarks read to tell
        a server's frontends apart (not exported)."""
        # prometheus_client keeps this process's own value of a multiprocess counter there.
        return int(self.generation_tokens._value.get()) + self._pending_tokens, self._last_sent_at

    def flush(self) -> None:
        """Writes the pending per-token metrics to this process's files (see FLUSH_S). The
        histogram's bucket and sum values are its own (prometheus_client has no public call that
        observes one value several times); observe() writes the same ones."""
        self._flushed_at = time.monotonic()
        if self._pending_tokens:
            self.generation_tokens.inc(self._pending_tokens)
            self._pending_tokens = 0
        if any(self._pending_itl):
            histogram = self.inter_token_latency
            for bucket, count in zip(histogram._buckets, self._pending_itl, strict=True):
                if count:
                    bucket.inc(count)
            histogram._sum.inc(self._pending_itl_sum)
            self._pending_itl = [0] * len(self._itl_bounds)
            self._pending_itl_sum = 0.0

    def _finished(self, reason: str) -> Counter:
        counter = self.request_success.get(reason)
        if counter is None:  # a reason serving.proto does not name yet: counted all the same
            counter = self.request_success[reason] = self._request_success.labels(
                self.model_name, reason
            )
        return counter

    def render(self, server_info: serving_pb2.ServerInfoResponse | None) -> bytes:
        """The exposition of a scrape (content type CONTENT_TYPE): every frontend's request
        metrics, summed, and the engine core's state from server_info (left out when None)."""
        self.flush()
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiproc_dir)
        if server_info is not None:
            registry.register(CoreCollector(self.model_name, server_info))
        return generate_latest(registry)


class CoreCollector:
    """The engine core's state as vLLM names it, from one GetServerInfo answer, summed over the
    replicas. KV cache usage is a fraction of all blocks (1 = full), as vLLM's. Counters count
    since each replica started (a replica scaled away takes its counts with it), but the engine
    step counters (pagedserve's own: steps, those in CUDA graphs, their time), which keep them."""

    def __init__(self, model_name: str, info: serving_pb2.ServerInfoResponse) -> None:
        self.model_name = model_name
        self.info = info

    def collect(self) -> Iterator[Metric]:
        replicas = self.info.replicas
        total_blocks = sum(r.num_blocks for r in replicas)
        used_blocks = sum(r.kv_usage * r.num_blocks for r in replicas)
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        for kind, name, doc, value in (
            (gauge, "num_requests_running", "Number of requests in model execution batches.",
             sum(r.num_running for r in replicas)),
            (gauge, "num_requests_waiting", "Number of requests waiting to be processed.",
             sum(r.num_waiting for r in replicas)),
            (gauge, "num_requests_swapped", "Number of requests swapped out to host memory.",
             sum(r.num_swapped for r in replicas)),
            (gauge, "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
             used_blocks / total_blocks if total_blocks else 0.0),
            (counter, "prefix_cache_queries",
             "Prefix cache queries, in terms of number of queried tokens.",
             sum(r.prefix_cache_queries for r in replicas)),
            (counter, "prefix_cache_hits",
             "Prefix cache hits, in terms of number of cached tokens.",
             sum(r.prefix_cache_hits for r in replicas)),
            (counter, "num_preemptions", "Cumulative number of preemption from the engine.",
             sum(r.num_preemptions for r in replicas)),
            (counter, "engine_steps", "Engine steps learned from the workers.",
             self.info.num_steps),
            (counter, "engine_cuda_graph_steps", "Engine steps that replayed a whole CUDA graph.",
             self.info.num_graph_steps),
            (counter, "engine_piecewise_graph_steps",
             "Engine steps that replayed CUDA graphs in pieces, their attention between them.",
             self.info.num_piecewise_steps),
            (counter, "engine_step_seconds",
             "Time in engine steps: each from learning the step before it to learning it.",
             self.info.step_seconds),
        ):  # fmt: skip
            metric = kind(PREFIX + name, doc, labels=["model_name"])
            metric.add_metric([self.model_name], value)
            yield metric
