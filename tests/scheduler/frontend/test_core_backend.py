"""A frontend's Backend against a real engine core over its real Connect stream, one fake rank
behind it (token i + 1 follows token i): text, stop strings, FINAL_ONLY, logprobs, refusals,
clients that leave, frontends whose stream breaks and frontends that hang. The tokenizer's
tokens are fixed pieces of text."""

import asyncio
import ctypes
import os
import threading

import grpc
import pytest

from protos import serving_pb2
from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.frontend.backend import ServingError
from scheduler.frontend.core_backend import CoreBackend
from scheduler.sampling_params import RequestOutputKind, SamplingParams
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import (
    PieceTokenizer,
    blocks_in_use,
    fake_rank,
    running_core,
    wait_until,
)

FINAL_ONLY = RequestOutputKind.FINAL_ONLY


@pytest.fixture
def rank():
    return fake_rank()


@pytest.fixture
def core(rank):
    with running_core(rank) as core:
        yield core


async def connected(core, heartbeat: Heartbeat = HEARTBEAT) -> CoreBackend:
    """A backend on this loop, connected and ready."""
    backend = CoreBackend("fake", [core.address], heartbeat=heartbeat)
    await backend.core.start()
    backend.set_tokenizer(PieceTokenizer())
    await asyncio.wait_for(backend.became_ready.wait(), TIMEOUT)
    return backend


def with_backend(core, body):
    """Runs body(backend) on a fresh event loop, the backend closed after it."""

    async def main():
        backend = await connected(core)
        try:
            return await asyncio.wait_for(body(backend), TIMEOUT)
        finally:
            await backend.core.close()

    return asyncio.run(main())


def request(prompt=(1,), request_id="", **params) -> serving_pb2.GenerateRequest:
    msg = serving_pb2.GenerateRequest(
        request_id=request_id, params=SamplingParams(temperature=0, **params).to_proto()
    )
    msg.prompt_token_ids.ids.extend(prompt)
    return msg


def bad_top_p() -> serving_pb2.GenerateRequest:
    msg = request()
    msg.params.top_p = 0
    return msg


async def responses(backend, msg) -> list[serving_pb2.GenerateResponse]:
    return [r async for r in backend.generate(msg)]


def test_tokens_and_text_are_streamed_and_the_last_message_carries_the_end(core):
    got = with_backend(core, lambda b: responses(b, request((1, 1), max_tokens=4)))
    assert [t for r in got for t in r.token_ids] == [2, 3, 4, 5]
    assert "".join(r.text for r in got) == " cat sat on a"
    last = got[-1]
    assert (last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens) == (
        "length",
        2,
        4,
    )
    assert list(last.prompt_token_ids) == [1, 1]
    assert all(not r.finish_reason for r in got[:-1])


def test_a_stop_string_across_tokens_ends_the_completion_and_the_core_frees_it(core):
    got = with_backend(core, lambda b: responses(b, request(max_tokens=20, stop=["t on"])))
    assert [t for r in got for t in r.token_ids] == [2, 3, 4]  # " cat", " sat", " on"
    assert "".join(r.text for r in got) == " cat sa"
    assert (got[-1].finish_reason, got[-1].stop_str) == ("stop", "t on")
    assert got[-1].usage.completion_tokens == 3
    wait_until(lambda: blocks_in_use(core) == 0, "the stopped request's blocks are free")


def test_final_only_is_one_message_holding_what_the_stream_holds(core, rank):
    rank.logprobs = True

    async def both(backend):
        streamed = await responses(backend, request(max_tokens=4, logprobs=0))
        final = await responses(backend, request(max_tokens=4, logprobs=0, output_kind=FINAL_ONLY))
        return streamed, final

    streamed, [final] = with_backend(core, both)
    assert list(final.token_ids) == [t for r in streamed for t in r.token_ids] == [2, 3, 4, 5]
    assert final.text == "".join(r.text for r in streamed) == " cat sat on a"
    assert list(final.logprobs) == [p for r in streamed for p in r.logprobs]
    assert [p.entries[0].logprob for p in final.logprobs] == [
        pytest.approx(-t / 10) for t in final.token_ids
    ]
    assert final.logprobs[0].entries[0].decoded_token == " cat"
    assert final.cumulative_logprob == pytest.approx(streamed[-1].cumulative_logprob)
    assert (final.finish_reason, final.usage.completion_tokens) == ("length", 4)


def test_final_only_with_a_stop_string_and_n_completions(core):
    msg = request(max_tokens=20, stop=["t on"], n=2, output_kind=FINAL_ONLY)
    got = with_backend(core, lambda b: responses(b, msg))
    assert sorted(r.index for r in got) == [0, 1]
    for r in got:
        assert (list(r.token_ids), r.text, r.stop_str) == ([2, 3, 4], " cat sa", "t on")


@pytest.mark.parametrize(
    "msg,code,words",
    [
        (request((1, 10)), grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: 10 is outside"),
        (bad_top_p(), grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (request((1,) * 64), grpc.StatusCode.INVALID_ARGUMENT, "shorter than max_model_len=64"),
    ],
    ids=["vocabulary", "top_p", "too-long"],
)
def test_bad_requests_are_refused_with_a_code_and_a_sentence(core, msg, code, words):
    with pytest.raises(ServingError) as err:
        with_backend(core, lambda b: responses(b, msg))
    assert err.value.code == code and words in err.value.message


def test_max_tokens_past_the_context_ends_there_or_is_refused_as_asked(core):
    """A prompt of 60 of max_model_len=64 tokens: max_tokens=4 fits exactly, unset (None) and 5
    run to the end of the context (finish_reason "length", as vLLM's offline LLM); with
    refuse_past_context (the OpenAI API's way) 5 is refused, naming the room left."""

    async def run(backend):
        runs = [await responses(backend, request((1,) * 60, max_tokens=m)) for m in (4, None, 5)]
        exact = backend.generate(request((1,) * 60, max_tokens=4), refuse_past_context=True)
        runs.append([r async for r in exact])
        return runs

    for got in with_backend(core, run):
        assert len([t for r in got for t in r.token_ids]) == 4
        assert got[-1].finish_reason == "length"

    async def refused(backend):
        past = backend.generate(request((1,) * 60, max_tokens=5), refuse_past_context=True)
        return [r async for r in past]

    with pytest.raises(ServingError) as err:
        with_backend(core, refused)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.message.startswith(
        "max_tokens=5 is too large: the prompt_token_ids is 60 tokens long and max_model_len=64, "
        "which leaves at most 4 new tokens"
    )


def with_field(name: str, value) -> serving_pb2.GenerateRequest:
    msg = request()
    if name in ("request_id", "cache_salt"):
        setattr(msg, name, value)
    elif isinstance(value, list):
        getattr(msg.params, name).extend(value)
    else:
        setattr(msg.params, name, value)
    return msg


@pytest.mark.parametrize(
    "msg,words",
    [
        (with_field("n", 9), "n=9 completions exceed scheduler.max_num_seqs=8"),
        (with_field("n", 2**31 - 1), "n=2147483647 completions exceed scheduler.max_num_seqs=8"),
        (with_field("request_id", "x" * 257), "request_id must be at most 256 characters"),
        (with_field("cache_salt", "s" * 257), "cache_salt must be at most 256 characters"),
        (with_field("stop", ["a"] * 65), "stop: at most 64 strings, got 65"),
        (with_field("stop", ["a" * 1025]), "stop: a string must be at most 1024 characters"),
        (with_field("stop_token_ids", [1] * 1025), "stop_token_ids: at most 1024 ids, got 1025"),
        (with_field("stop_token_ids", [3, 10]), "stop_token_ids: 10 is outside the vocabulary"),
        (with_field("temperature", float("inf")), "temperature must be a finite number"),
        (with_field("repetition_penalty", float("nan")), "repetition_penalty must be a finite"),
    ],
    ids=[
        "n",
        "n-max-int32",
        "request-id",
        "cache-salt",
        "stop-count",
        "stop-length",
        "stop-ids-count",
        "stop-id-vocab",
        "temperature",
        "repetition-penalty",
    ],
)
def test_unbounded_fields_are_refused_by_the_frontend_before_the_core_sees_them(core, msg, words):
    async def refused(backend):
        with pytest.raises(ServingError) as err:
            await responses(backend, msg)
        return err.value, await backend.server_info()

    error, info = with_backend(core, refused)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and words in error.message
    assert [f.num_requests for f in info.frontends] == [0]  # nothing was sent to the core


def test_an_id_in_flight_is_refused_and_free_again_once_answered(core, rank):
    async def twice(backend):
        first = backend.generate(request(request_id="x", max_tokens=30))
        await anext(first)
        with pytest.raises(ServingError) as err:
            await responses(backend, request(request_id="x", max_tokens=2))
        async for _ in first:
            pass
        return err.value, await responses(backend, request(request_id="x", max_tokens=2))

    error, again = with_backend(core, twice)
    assert error.code == grpc.StatusCode.ALREADY_EXISTS and "'x' is already in use" in error.message
    assert again[-1].finish_reason == "length"


def test_a_client_that_leaves_aborts_its_request_and_frees_its_blocks(core):
    async def leave(backend):
        stream = backend.generate(request(request_id="gone", max_tokens=50))
        await anext(stream)
        await stream.aclose()

    with_backend(core, leave)
    wait_until(lambda: blocks_in_use(core) == 0, "the abandoned request's blocks are free")
    assert not core.fleet.abort("gone")


def test_a_frontend_whose_stream_breaks_loses_its_requests_and_the_others_go_on(core, rank):
    async def two_frontends():
        kept, lost = await connected(core), await connected(core)
        try:
            survivor = kept.generate(request((1, 1), max_tokens=40))
            casualty = lost.generate(request((2, 2), max_tokens=40))
            await anext(survivor), await anext(casualty)
            info = await kept.server_info()
            assert [f.num_unfinished for f in info.frontends] == [1, 1]
            await lost.core.close()  # as when its process dies: the stream ends
            with pytest.raises(ServingError) as err:
                async for _ in casualty:
                    pass
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
            got = [r async for r in survivor]
            return got, await kept.server_info()
        finally:
            await kept.core.close()
            await lost.core.close()

    got, info = asyncio.run(asyncio.wait_for(two_frontends(), TIMEOUT))
    assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 40
    assert len(info.frontends) == 1
    wait_until(lambda: blocks_in_use(core) == 0, "the lost frontend's blocks are free")


def test_a_frontend_whose_event_loop_blocks_is_hung_up_on_and_the_others_go_on(rank):
    """The hung frontend's loop is blocked (its process alive, its connection open, gRPC's
    threads answering pings): its silence alone gives it away."""
    beat = Heartbeat(interval_s=0.05, timeout_s=0.5)
    hung, unblock = [], threading.Event()
    hung_up = threading.Event()
    blocked = asyncio.new_event_loop()  # the hung frontend's loop, on a thread of its own
    thread = threading.Thread(target=blocked.run_forever, daemon=True)
    thread.start()

    def on_hung(pid: int) -> None:
        hung.append(pid)
        hung_up.set()

    async def on_blocked(coro):
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, blocked))

    async def drain(stream) -> list:
        return [r async for r in stream]

    async def two_frontends(core):
        kept, lost = await connected(core, beat), await on_blocked(connected(core, beat))
        try:
            rank.hold = True  # the requests stay unfinished until the hang is found
            survivor = kept.generate(request((1, 1), max_tokens=40))
            casualty = lost.generate(request((2, 2), max_tokens=40))
            casualty_ends = asyncio.ensure_future(on_blocked(drain(casualty)))
            got = asyncio.ensure_future(drain(survivor))
            while [f.num_unfinished for f in (await kept.server_info()).frontends] != [1, 1]:
                await asyncio.sleep(0.01)
            blocked.call_soon_threadsafe(unblock.wait, TIMEOUT)  # its loop stops turning
            assert await asyncio.to_thread(hung_up.wait, TIMEOUT)
            info = await kept.server_info()
            rank.hold = False
            rank.release.set()
            unblock.set()
            with pytest.raises(ServingError) as err:
                await casualty_ends
            return await got, info, err.value
        finally:
            unblock.set()
            await kept.core.close()
            await on_blocked(lost.core.close())

    try:
        with running_core(rank, heartbeat=beat, on_hung=on_hung) as core:
            got, info, error = asyncio.run(asyncio.wait_for(two_frontends(core), TIMEOUT))
            assert hung == [os.getpid()]
            assert [f.num_unfinished for f in info.frontends] == [1]  # the survivor's own
            assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 40
            assert error.code == grpc.StatusCode.UNAVAILABLE  # the hung one's client is told
            wait_until(lambda: blocks_in_use(core) == 0, "every block is free")
    finally:
        blocked.call_soon_threadsafe(blocked.stop)
        thread.join(TIMEOUT)


def test_a_core_that_stands_still_hangs_up_on_no_frontend(rank):
    """Every thread of the core's process stops (the GIL held through a C call, as a host's
    pause or a debugger would): the frontends' heartbeats wait unread, and are not missing."""
    beat = Heartbeat(interval_s=0.05, timeout_s=0.5)
    hung = []

    async def stand_still(core):
        backend = await connected(core, beat)
        try:
            ctypes.PyDLL(None).usleep(1_000_000)  # holds the GIL: nothing in the process runs
            await asyncio.sleep(2 * beat.timeout_s)  # the watchdog looks several times
            return [r async for r in backend.generate(request(max_tokens=3))]
        finally:
            await backend.core.close()

    with running_core(rank, heartbeat=beat, on_hung=hung.append) as core:
        got = asyncio.run(asyncio.wait_for(stand_still(core), TIMEOUT))
    assert hung == []
    assert got[-1].finish_reason == "length"


@pytest.mark.parametrize("ready_wait_s", [0.0, TIMEOUT])
def test_a_call_before_the_model_is_known_waits_ready_wait_s_for_it(core, ready_wait_s):
    """A generate that comes before the tokenizer is set (the core connected, the model known):
    refused UNAVAILABLE at once without ready_wait_s (as while the model loads); with it,
    served once the tokenizer arrives (as a frontend started again serves its first calls)."""

    async def main():
        backend = CoreBackend("fake", [core.address], ready_wait_s=ready_wait_s)
        await backend.core.start()
        try:
            call = asyncio.ensure_future(responses(backend, request((1,), max_tokens=3)))
            await asyncio.sleep(0.2)
            backend.set_tokenizer(PieceTokenizer())
            try:
                return [list(r.token_ids) for r in await asyncio.wait_for(call, TIMEOUT)]
            except ServingError as e:
                return e.code, e.message
        finally:
            await backend.core.close()

    got = asyncio.run(main())
    if ready_wait_s:
        assert [t for ids in got for t in ids] == [2, 3, 4]
    else:
        assert got == (grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry shortly")
