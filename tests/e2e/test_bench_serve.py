"""`pagedserve bench serve` over gRPC against the session's running cluster: two request
rates, a few requests each; the JSON results are whole and consistent (the server's engine
steps among them) and the plot is a PNG.

(Here rather than in tests/cluster: the session's cluster keeps its Ray up, and some modules
there need a Ray of their own.)"""

import json

from cluster import cli


def test_bench_serve_over_grpc(local_cluster, tmp_path, capsys):
    result, png = tmp_path / "serve.json", tmp_path / "serve.png"
    code = cli.main(
        [
            "bench",
            "serve",
            "--address",
            local_cluster.address,
            "--request-rate",
            "8",
            "inf",
            "--max-concurrency",
            "3",
            "--num-prompts",
            "4",
            "--input-len",
            "8",
            "--output-len",
            "5",
            "--result-json",
            str(result),
            "--plot",
            str(png),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| rate (req/s) |" in out
    results = json.loads(result.read_text())
    assert (results["backend"], results["num_prompts"]) == ("grpc", 4)
    assert [r["request_rate"] for r in results["runs"]] == [8.0, "inf"]
    for r in results["runs"]:
        assert (r["num_requests"], r["completed"], r["failed"]) == (4, 4, 0)
        assert r["max_concurrency"] == 3
        assert r["total_input_tokens"] == 4 * 8
        assert r["total_output_tokens"] == 4 * 5  # ignore_eos: exactly --output-len each
        assert r["request_throughput"] == 4 / r["duration_s"] > 0
        assert r["output_throughput"] == 4 * 5 / r["duration_s"]
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            stats = r[key]
            assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
        # Each request's TTFT is below its end-to-end latency, so each percentile is too.
        assert all(r["ttft_ms"][p] < r["e2e_ms"][p] for p in ("p50", "p90", "p99"))
        assert r["itl_ms"]["p99"] < r["e2e_ms"]["p99"]
        # The server's steps meanwhile (GetServerInfo): at least one a token, none in a CUDA
        # graph on the CPU.
        engine = r["engine"]
        assert engine["steps"] >= 5 and engine["graph_share"] == engine["piecewise_share"] == 0
        assert engine["mean_step_ms"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
