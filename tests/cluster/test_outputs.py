"""collect(): a Generate stream of hand-built messages folded into vLLM's output shapes."""

import asyncio

import pytest

from cluster.outputs import (
    OutputCollector,
    RequestOutput,
    Timings,
    Usage,
    collect,
    collect_async,
)
from protos import serving_pb2
from scheduler.logprobs import Logprob


def _msg(index: int, token_ids: list[int], text: str, **fields) -> serving_pb2.GenerateResponse:
    return serving_pb2.GenerateResponse(
        request_id="r1", index=index, token_ids=token_ids, text=text, **fields
    )


def _logprobs(*positions: list[tuple[int, float, int, str]]) -> list[serving_pb2.TokenLogprobs]:
    return [
        serving_pb2.TokenLogprobs(
            entries=[
                serving_pb2.Logprob(token_id=t, logprob=lp, rank=r, decoded_token=d)
                for t, lp, r, d in position
            ]
        )
        for position in positions
    ]


def _last(index: int, token_ids: list[int], text: str, completion_tokens: int, **fields):
    return _msg(
        index,
        token_ids,
        text,
        usage=serving_pb2.Usage(
            prompt_tokens=3, completion_tokens=completion_tokens, cached_tokens=2
        ),
        timings=serving_pb2.Timings(queue_ms=1.0, time_to_first_token_ms=5.0, total_ms=9.0),
        prompt_token_ids=[7, 8, 9],
        **fields,
    )


# Two completions, interleaved; completion 1 stops on a stop string, completion 0 on length.
STREAM = [
    _msg(0, [10], "Pa"),
    _msg(1, [20, 21], "Lo"),
    _last(1, [22], "n", 3, finish_reason="stop", stop_str="don"),
    _last(0, [11, 12], "ris", 3, finish_reason="length"),
]


def test_two_interleaved_completions_fold_in_index_order():
    out = collect(STREAM, n=2, prompt="Capital?")
    assert isinstance(out, RequestOutput)
    assert (out.request_id, out.prompt, out.prompt_token_ids) == ("r1", "Capital?", [7, 8, 9])
    assert out.finished
    first, second = out.outputs
    assert (first.index, first.text, first.token_ids) == (0, "Paris", [10, 11, 12])
    assert (first.finish_reason, first.stop_reason) == ("length", None)
    assert (second.text, second.token_ids) == ("Lon", [20, 21, 22])
    assert (second.finish_reason, second.stop_reason) == ("stop", "don")
    assert first.usage == Usage(prompt_tokens=3, completion_tokens=3, cached_tokens=2)
    assert first.timings == Timings(queue_ms=1.0, time_to_first_token_ms=5.0, total_ms=9.0)
    assert first.logprobs is None and first.cumulative_logprob is None


def test_a_stop_token_is_the_stop_reason():
    out = collect([_last(0, [5, 2], "ab", 2, finish_reason="stop", stop_token_id=2)])
    assert out.outputs[0].stop_reason == 2


def test_logprobs_leave_their_wire_form_once():
    stream = [
        _msg(
            0,
            [4],
            "a",
            logprobs=_logprobs([(4, -0.5, 1, "a"), (6, -1.5, 2, "c")]),
            cumulative_logprob=-0.5,
        ),
        _last(
            0,
            [5],
            "b",
            2,
            finish_reason="length",
            cumulative_logprob=-2.5,
            logprobs=_logprobs([(5, -2.0, 3, "b"), (4, -0.25, 1, "a")]),
        ),
    ]
    out = collect(stream).outputs[0]
    assert out.logprobs == [
        {4: Logprob(-0.5, 1, "a"), 6: Logprob(-1.5, 2, "c")},
        {5: Logprob(-2.0, 3, "b"), 4: Logprob(-0.25, 1, "a")},
    ]
    assert [next(iter(p)) for p in out.logprobs] == out.token_ids  # the sampled token first
    assert out.cumulative_logprob == -2.5


def test_snapshots_are_the_callers_and_the_collector_tracks_the_end():
    collector = OutputCollector(n=2, prompt_token_ids=[7, 8, 9])
    seen = []
    for msg in STREAM:
        collector.add(msg)
        seen.append(collector.snapshot())
    assert [s.finished for s in seen] == [False, False, False, True]
    assert seen[0].outputs[0].token_ids == [10]  # not changed by the later messages
    assert seen[0].prompt_token_ids == [7, 8, 9]  # known before the server sends them
    assert seen[2].outputs[1].finished and not seen[2].outputs[0].finished


def test_a_stream_that_ends_early_or_names_another_completion_is_an_error():
    with pytest.raises(RuntimeError, match="ended before every completion finished"):
        collect(STREAM[:3], n=2)
    with pytest.raises(ValueError, match="index 1 is outside the request's 1 completions"):
        collect(STREAM, n=1)


def test_collect_async_folds_alike():
    async def stream():
        for msg in STREAM:
            yield msg

    assert asyncio.run(collect_async(stream(), n=2, prompt="Capital?")) == collect(
        STREAM, n=2, prompt="Capital?"
    )
