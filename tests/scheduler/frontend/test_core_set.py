"""A frontend's Backend in front of two real engine cores (each one replica of its own fake
rank, token i + 1 following token i): requests routed by load, each answered by its own core;
aborts, stop strings and Serving's Abort reaching the core that holds the request; the cores'
states merged; one core gone while the other serves on."""

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import grpc
import pytest

from scheduler.core.engine_core import EngineCore
from scheduler.frontend.backend import ServingError
from scheduler.frontend.core_backend import CoreBackend
from scheduler.frontend.prefix_index import CHUNK
from scheduler.sampling_params import RequestOutputKind
from tests.scheduler.core.fake_placer import FakePlacer
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import (
    BLOCK_SIZE,
    ENGINE_CONFIGS,
    NUM_BLOCKS,
    PieceTokenizer,
    blocks_in_use,
    fake_rank,
    running_core,
    wait_until,
)
from tests.scheduler.frontend.test_core_backend import request, responses


@pytest.fixture
def ranks():
    return fake_rank(), fake_rank()


@pytest.fixture
def cores(ranks):
    with running_core(ranks[0]) as first, running_core(ranks[1]) as second:
        yield first, second


def with_backend(cores, body):
    """Runs body(backend) on a fresh event loop, the backend (over both cores) closed after."""

    async def main():
        backend = CoreBackend("fake", [core.address for core in cores])
        await backend.core.start()
        backend.set_tokenizer(PieceTokenizer())
        await asyncio.wait_for(_until(lambda: backend.core.num_serving == len(cores)), TIMEOUT)
        try:
            return await asyncio.wait_for(body(backend), TIMEOUT)
        finally:
            await backend.core.close()

    return asyncio.run(main())


def sampled_requests(rank) -> set[str]:
    """The request ids a fake rank sampled tokens for (a completion's id: the request's, or
    "<request_id>#<index>")."""
    return {completion_id.split("#")[0] for completion_id in rank.sampled}


def test_requests_go_to_the_core_holding_the_fewest_and_each_core_answers_its_own(cores, ranks):
    async def four(backend):
        streams = [
            backend.generate(request((1, i % 3 + 1), request_id=f"r{i}", max_tokens=30))
            for i in range(4)
        ]
        firsts = []
        for stream in streams:  # each added once the one before holds its core
            firsts.append(await anext(stream))
        held = [core.num_requests for core in backend.core.cores]
        rests = [[r async for r in stream] for stream in streams]
        return held, [[first, *rest] for first, rest in zip(firsts, rests, strict=True)]

    held, answers = with_backend(cores, four)
    assert held == [2, 2]
    assert sampled_requests(ranks[0]) == {"r0", "r2"}
    assert sampled_requests(ranks[1]) == {"r1", "r3"}
    for i, got in enumerate(answers):
        last = i % 3 + 1  # the prompt's last token; each token is the one before's successor
        assert [t for r in got for t in r.token_ids] == [(last + k) % 9 + 1 for k in range(30)]
        assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 30


def test_prompts_sharing_a_prefix_go_to_the_core_that_was_sent_it(cores, ranks):
    """Within the load bound a shared prefix outweighs load; a prompt without it goes by load.
    The first core's rank holds its steps, so its requests stay unfinished meanwhile."""
    shared = [1, 2, 3, 4] * (CHUNK // 2)  # two full chunks
    ranks[0].hold = True

    async def body(backend):
        firsts = []
        for i in range(3):
            stream = backend.generate(request((*shared, 1 + i), request_id=f"p{i}", max_tokens=20))
            firsts.append((stream, asyncio.ensure_future(anext(stream))))
            await _until(lambda i=i: backend.core.cores[0].num_requests == i + 1)
        other = await responses(backend, request((5,) * 40, request_id="other", max_tokens=20))
        held = [core.num_requests for core in backend.core.cores]
        ranks[0].release.set()
        for stream, first in firsts:
            await first
            async for _ in stream:
                pass
        return held, other

    held, other = with_backend(cores, body)
    assert held == [3, 0]  # the shared prefix's three on the first core, held there
    assert other[-1].usage.completion_tokens == 20
    assert sampled_requests(ranks[0]) == {"p0", "p1", "p2"}
    assert sampled_requests(ranks[1]) == {"other"}


def test_stop_strings_and_client_aborts_reach_the_core_that_holds_the_request(cores, ranks):
    async def on_the_second(backend):
        held = backend.generate(request(request_id="first", max_tokens=50))
        await anext(held)  # on the first core: the next goes to the second
        stopped = await responses(backend, request(request_id="s", max_tokens=50, stop=["t on"]))
        leaving = backend.generate(request(request_id="gone", max_tokens=50))
        await anext(leaving)
        await leaving.aclose()
        await held.aclose()
        return stopped

    stopped = with_backend(cores, on_the_second)
    assert sampled_requests(ranks[1]) == {"s", "gone"}
    # Stopped by its core at the stop string (a few steps later: the rank answers at once),
    # not run to its 50 tokens.
    assert ranks[1].sampled["s"] < 50
    assert [t for r in stopped for t in r.token_ids] == [2, 3, 4]
    assert (stopped[-1].finish_reason, stopped[-1].stop_str) == ("stop", "t on")
    for core in cores:
        wait_until(lambda core=core: blocks_in_use(core) == 0, "every request's blocks are free")


def test_servings_abort_finds_a_request_on_either_core_and_server_info_merges_them(cores):
    async def body(backend):
        streams = [backend.generate(request(request_id=f"a{i}", max_tokens=60)) for i in range(2)]
        for stream in streams:
            await anext(stream)
        info = await backend.server_info()
        found = [await backend.abort(f"a{i}") for i in range(2)] + [await backend.abort("none")]
        ends = [[r async for r in stream][-1].finish_reason for stream in streams]
        with pytest.raises(ServingError) as scale:
            await backend.scale(3)
        return info, found, ends, scale.value

    info, found, ends, scale = with_backend(cores, body)
    assert sorted(r.replica_id for r in info.replicas) == [0, 1]  # core 0's, core 1's replica 0
    assert [r.num_running + r.num_waiting for r in info.replicas] == [1, 1]
    # Both cores stepped (each its request's first token at least): their steps' time summed.
    assert info.num_steps >= 2 and info.step_seconds > 0 and info.num_graph_steps == 0
    [frontend] = info.frontends  # this frontend, on both cores
    assert (frontend.num_requests, frontend.num_unfinished) == (2, 2)
    assert found == [True, True, False]
    assert ends == ["abort", "abort"]
    # These cores have no placer: each refuses, and the frontend passes the refusal on.
    assert scale.code == grpc.StatusCode.FAILED_PRECONDITION and "placer" in scale.message


@contextlib.contextmanager
def placed_core(placer: FakePlacer) -> Iterator[EngineCore]:
    """An EngineCore over one replica its placer placed, which can scale (the placer places
    and releases fake ranks)."""
    core = EngineCore("fake")
    try:
        core.start([placer.place(0)], ENGINE_CONFIGS, placer=placer)
        yield core
    finally:
        core.stop()


def test_scale_splits_the_replicas_over_the_cores_each_keeping_one():
    placers = FakePlacer(NUM_BLOCKS, BLOCK_SIZE), FakePlacer(NUM_BLOCKS, BLOCK_SIZE)

    async def body(backend):
        up = await backend.scale(5)
        info = await backend.server_info()
        down = await backend.scale(2)
        with pytest.raises(ServingError) as refused:
            await backend.scale(1)
        return up, info, down, refused.value

    with placed_core(placers[0]) as first, placed_core(placers[1]) as second:
        up, info, down, refused = with_backend((first, second), body)
    # Core 0 takes 3 replicas (its 0, 1, 2: ids 0, 2, 4), core 1 takes 2 (ids 1, 3).
    assert list(up.serving) == [0, 1, 2, 3, 4] and list(up.added) == [2, 3, 4]
    assert [p.num_placed for p in placers] == [3, 2]
    assert sorted(r.replica_id for r in info.replicas) == [0, 1, 2, 3, 4]
    assert list(down.serving) == [0, 1] and list(down.draining) == [2, 3, 4]
    assert refused.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "2 engine cores" in refused.message and "at least 2 replicas, not 1" in refused.message


def test_while_no_core_serves_a_request_waits_in_one_whose_replica_recovers():
    placers = FakePlacer(NUM_BLOCKS, BLOCK_SIZE), FakePlacer(NUM_BLOCKS, BLOCK_SIZE)

    async def body(backend):
        for placer in placers:  # every core's only replica fails; its restart waits
            placer.may_place.clear()
            placer.kill(0)
        await _until(lambda: not backend.core.serving)
        waiting = asyncio.ensure_future(responses(backend, request((1, 1), max_tokens=4)))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # held, not refused
        for placer in placers:
            placer.may_place.set()
        return await waiting

    with placed_core(placers[0]) as first, placed_core(placers[1]) as second:
        got = with_backend((first, second), body)
    assert [t for r in got for t in r.token_ids] == [2, 3, 4, 5]
    assert got[-1].finish_reason == "length"


def test_a_core_that_goes_ends_its_requests_and_the_other_takes_the_new_ones(ranks):
    with running_core(ranks[1]) as kept:
        gone = running_core(ranks[0])
        lost = gone.__enter__()

        async def body(backend):
            casualty = backend.generate(request(request_id="c", max_tokens=60))
            await anext(casualty)  # on the first core
            gone.__exit__(None, None, None)  # that core stops: its streams end
            with pytest.raises(ServingError) as err:
                async for _ in casualty:
                    pass
            await asyncio.wait_for(_until(lambda: not backend.core.cores[0].connected), TIMEOUT)
            after = [await responses(backend, request(max_tokens=5)) for _ in range(3)]
            return err.value, after, backend.ready()

        error, after, ready = with_backend((lost, kept), body)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert [got[-1].usage.completion_tokens for got in after] == [5, 5, 5]
    assert ready
    assert len(ranks[1].sampled) == 3


def test_a_request_with_nothing_sent_yet_moves_to_another_core_when_its_core_goes(ranks):
    """The first core's rank holds its first step, so its request has no token when the core
    stops: the frontend sends it to the other core and the client sees one whole answer."""
    ranks[0].hold = True
    with running_core(ranks[1]) as kept:
        gone = running_core(ranks[0])
        lost = gone.__enter__()
        stopping = threading.Thread(target=gone.__exit__, args=(None, None, None))

        async def body(backend):
            waiting = asyncio.ensure_future(
                responses(backend, request((1, 1), request_id="w", max_tokens=6))
            )
            await asyncio.to_thread(ranks[0].held.wait, TIMEOUT)  # on the first core, held
            stopping.start()  # its streams end first, then it waits on the held step
            return await waiting

        try:
            got = with_backend((lost, kept), body)
        finally:
            ranks[0].release.set()
            if stopping.is_alive() or stopping.ident is not None:
                stopping.join(TIMEOUT)
    assert [t for r in got for t in r.token_ids] == [2, 3, 4, 5, 6, 7]
    assert got[-1].finish_reason == "length"
    assert ranks[1].sampled["w"] == 6


def test_a_one_message_request_whose_core_goes_after_some_steps_moves_whole(ranks):
    """A request shown only at its end (one message): its first core samples two tokens or
    more, held back in the frontend, then stops; nothing was sent, so the other core computes
    it from the start and the client gets one message with every token once."""
    first, answer = ranks[0], ranks[0].answer

    def answer_then_hold(plan):  # the step after its second token waits
        result = answer(plan)
        first.hold = first.sampled["w"] >= 2
        return result

    first.answer = answer_then_hold
    with running_core(ranks[1]) as kept:
        gone = running_core(first)
        lost = gone.__enter__()
        stopping = threading.Thread(target=gone.__exit__, args=(None, None, None))

        async def body(backend):
            msg = request(
                (1, 1), request_id="w", max_tokens=6, output_kind=RequestOutputKind.FINAL_ONLY
            )
            waiting = asyncio.ensure_future(responses(backend, msg))
            await asyncio.to_thread(first.held.wait, TIMEOUT)
            stopping.start()
            return await waiting

        try:
            got = with_backend((lost, kept), body)
        finally:
            first.release.set()
            if stopping.is_alive() or stopping.ident is not None:
                stopping.join(TIMEOUT)
    assert len(got) == 1 and list(got[0].token_ids) == [2, 3, 4, 5, 6, 7]
    assert got[0].finish_reason == "length" and got[0].usage.completion_tokens == 6
    assert first.sampled["w"] >= 2 and ranks[1].sampled["w"] == 6  # computed again, whole


async def _until(condition) -> None:
    while not condition():
        await asyncio.sleep(0.01)


def test_a_list_of_addresses_is_required():
    with pytest.raises(ValueError, match="list of engine-core addresses"):
        CoreBackend("fake", "127.0.0.1:1")
