"""`pagedserve bench latency | throughput`: the step anatomy, the roofline and the picking of
decode steps on hand-built step records; and `bench latency` end to end on the CPU."""

import re

import pytest
import torch

from cluster import cli
from cluster.benchmarks.report import (
    copy_bandwidth,
    decode_steps,
    format_anatomy,
    format_roofline,
    is_decode_step,
    make_roofline,
    measure_copy_bandwidth,
    records_between,
    roofline_ms,
    roofline_pct,
    step_anatomy,
)
from tests.conftest import REPO


def _record(start, duration, worker, idle, graph, scheduled):
    return {
        "start": start,
        "interval_ms": duration,
        "worker_ms": worker,
        "worker_idle_ms": idle,
        "cuda_graph": graph,
        "scheduled": scheduled,
    }


# A prefill, two decode steps on graphs, a mixed step (a decode and a prefill chunk), and a
# decode step run eagerly.
RECORDS = [
    _record(1.0, 10.0, 6.0, 1.0, False, {"a": 8}),
    _record(2.0, 4.0, 3.0, 0.5, True, {"a": 1}),
    _record(3.0, 5.0, 3.5, 0.5, True, {"a": 1, "b": 1}),
    _record(4.0, 6.0, 4.0, 1.0, False, {"a": 1, "b": 7}),
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
    assert a.median_worker_ms == 3.5  # of 3, 3, 3.5, 4, 6
    assert a.median_idle_ms == 0.5  # of 0.25, 0.5, 0.5, 1, 1
    assert a.idle_pct == pytest.approx(10.0)
    assert a.graph_hit_decode == pytest.approx(2 / 3)
    assert a.graph_hit_all == pytest.approx(2 / 5)
    text = "\n".join(format_anatomy(a))
    assert "5 (3 decode-only)" in text and "66.7% of decode-only steps" in text
    assert "40.0% of all steps" in text and "(10.0% of the median step)" in text


def test_step_anatomy_without_decode_steps_or_steps():
    a = step_anatomy(RECORDS[:1])
    assert a.num_decode_steps == 0
    assert a.median_decode_step_ms is None and a.graph_hit_decode is None
    assert step_anatomy([]) is None
    assert format_anatomy(None) == ["step anatomy (timed steps): no step records"]


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


def test_bench_latency_on_the_cpu(capsys):
    """`pagedserve bench latency` through the CLI on the embedded default config, tiny sizes."""
    code = cli.main(
        [
            "bench",
            "latency",
            "-c",
            f"{REPO}/configs/local.yaml",
            "--set",
            "cluster.num_cpus=2",
            "--set",
            "cache.cpu_cache_gb=0.5",
            "--set",
            "model.device=cpu",
            "--batch-size",
            "1",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "8",
            "--num-iters",
            "1",
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
