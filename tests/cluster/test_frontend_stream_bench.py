"""cluster.benchmarks.frontend_stream end to end, tiny: its counts are what the clients were
sent (every token once; a completion in one message with FINAL_ONLY, in at most a message a
token streamed), over gRPC and over the OpenAI-compatible HTTP API, and --profile returns the
frontend's event loop profile."""

import pytest

from cluster.benchmarks import frontend_stream

CLIENTS, REQUESTS, TOKENS = 2, 3, 5


@pytest.mark.parametrize("wire", ["grpc", "http"])
def test_counts_are_what_was_sent(wire):
    result = frontend_stream.run(
        CLIENTS, REQUESTS, TOKENS, "smollm2-135m-instruct", profile=True, wire=wire
    )
    completions = CLIENTS * REQUESTS
    delta, final_only = result["delta"], result["final_only"]
    assert delta["tokens"] == final_only["tokens"] == completions * TOKENS
    assert completions <= delta["messages"] <= completions * TOKENS
    assert final_only["messages"] == completions
    for p in (delta, final_only):
        assert p["tok_per_s"] == p["tokens"] / p["wall_s"] > 0
        assert p["cpu_s_per_1k_tokens"] >= 0
        assert 1 <= p["seqs_per_step"] <= completions
    assert result["ratio"] == delta["tok_per_s"] / final_only["tok_per_s"]
    # The frontend's request path ran under it.
    assert {"grpc": "core_backend.py", "http": "openai_api.py"}[wire] in result["profile"]
