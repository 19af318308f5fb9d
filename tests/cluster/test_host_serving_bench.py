"""cluster.benchmarks.host_serving end to end, tiny (one engine core and one per replica), and
the modelless rank it plays a device with (cluster.benchmarks.modelless_rank.SequenceRank)."""

import argparse
import re
import time

import pytest

from cluster.benchmarks import host_serving
from cluster.benchmarks.modelless_rank import FIRST_TOKEN, TOKEN_RANGE, SequenceRank
from protos import worker_pb2

REQUESTS, OUTPUT_LEN = 24, 6


def _args(**kw) -> argparse.Namespace:
    values = dict(
        frontends=2,
        clients=2,
        connections=2,
        spread=True,
        num_requests=REQUESTS,
        input_len=40,
        output_len=OUTPUT_LEN,
        max_num_seqs=8,  # three waves on one replica: requests wait for one another
        max_num_batched_tokens=64,  # a 40-token prompt is split over two steps at times
        device_ms=1.0,
        prefill_us=1.0,
        tokenizer="smollm2-135m-instruct",
        profile=True,
        request_rate=None,
    )
    values.update(kw)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("cores", [1, 2])
def test_every_token_reaches_the_clients_with_two_replicas_and_two_frontends(cores):
    result = host_serving.run(_args(), replicas=2, cores=cores)
    assert "engine.py" in result.pop("profile")  # the step loops ran under the profiler
    assert set(result) == {"one message", "streamed"}
    for p in result.values():
        assert p["requests"] == REQUESTS
        assert p["output_tokens"] == REQUESTS * OUTPUT_LEN  # none lost, none made up
        a = p["anatomy"]
        assert a is not None and a.num_steps >= 2 * OUTPUT_LEN  # both replicas stepped
        assert a.median_decode_step_ms >= 1.0  # the rank played its device's step time
        assert p["frontends"].startswith("frontends: ")
        parts = p["frontends"].removeprefix("frontends: ").split("; ")
        shares = [int(part.split("%")[0]) for part in parts]
        assert len(shares) == 2 and 98 <= sum(shares) <= 102  # every token, by its frontend
        assert shares == [50, 50]  # each client's requests to the frontends in turn (spread)
        for part, share in zip(parts, shares, strict=True):
            # a frontend that sent tokens sent its last within the pass
            last = part.rsplit("last message ", 1)[1]
            assert (last == "-") == (share == 0)
            if share:
                sent, core = re.fullmatch(
                    r"\+([\d.]+) s \(its last core message \+([\d.]+) s\)", last
                ).groups()
                # the tokens of the core's last message reach the client after it came
                assert 0 < float(core) <= float(sent) <= p["wall_s"] + 0.05
        assert len(p["core threads"]) == cores
        assert all("engines' step loops" in threads for threads in p["core threads"])


def test_a_poisson_pass_streams_every_token_and_reads_the_pass_steps():
    """--request-rate: bench serve's clients at a rate; every request completes with every token,
    and the pass's steps sit beside the latencies."""
    result = host_serving.run(_args(request_rate=[60.0]), replicas=1)
    assert "engine.py" in result.pop("profile")  # the step loops ran under the profiler
    (run,) = result.pop("rates")
    assert not result  # no one-message or streamed pass beside the rates
    assert (run["completed"], run["failed"]) == (REQUESTS, 0)
    assert run["total_output_tokens"] == REQUESTS * OUTPUT_LEN
    a = run["anatomy"]
    assert a is not None and a.num_steps >= OUTPUT_LEN and a.median_step_ms >= 1.0
    assert 1.0 <= run["seqs"] <= 8  # max_num_seqs
    # a request's OUTPUT_LEN tokens come from as many steps in turn, each of the rank's 1 ms (a
    # client may get several in one message, so the time after its first message can be less)
    assert run["e2e_ms"]["p50"] >= OUTPUT_LEN * 1.0 and run["ttft_ms"]["p50"] >= 1.0


def _plan(step_id: int, new=(), cached=()) -> worker_pb2.StepPlan:
    plan = worker_pb2.StepPlan(step_id=step_id)
    for rid, prompt_len, computed, scheduled in new:
        plan.new_requests.add(
            request_id=rid,
            token_ids=range(prompt_len),
            num_computed_tokens=computed,
            num_scheduled_tokens=scheduled,
        )
    c = plan.cached_requests
    for rid, computed, scheduled in cached:
        c.request_ids.append(rid)
        c.num_computed_tokens.append(computed)
        c.num_scheduled_tokens.append(scheduled)
    return plan


def test_sequence_rank_samples_once_a_prompt_is_computed_and_paces_steps():
    rank = SequenceRank(max_model_len=64, device_ms=20.0, prefill_us=1000.0)
    plans = [
        # a's 10-token prompt in two chunks (no token after the first), b's whole
        _plan(1, new=[("a", 10, 0, 6), ("b", 4, 0, 4)]),
        _plan(2, cached=[("a", 6, 4), ("b", 4, 1)]),
        _plan(3, cached=[("a", 10, 1), ("b", 5, 1)]),
    ]
    start = time.monotonic()
    results = list(rank.Execute(iter(plans), None))
    took = time.monotonic() - start
    assert [list(r.request_ids) for r in results] == [["b"], ["a", "b"], ["a", "b"]]
    token = [FIRST_TOKEN + (37 * n) % TOKEN_RANGE for n in range(3)]
    assert [list(r.token_ids) for r in results] == [
        [token[0]],
        [token[0], token[1]],
        [token[1], token[2]],
    ]
    # 20 ms a step, plus 1 ms for each token beyond one a request: (5 + 3) + 3 + 0 ms
    assert took >= 0.060 + 0.011
