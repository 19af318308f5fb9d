"""Overload and clients that leave, on real frontend servers in front of a real engine core (one
fake rank that can hold its steps): a frontend refuses beyond server.max_concurrent_requests and
the core beyond scheduler.max_queued_requests, at once, over gRPC (RESOURCE_EXHAUSTED) and HTTP
(429 with OpenAI's error JSON), the refused request never reaching the core; a deadline that
expires while a request waits or streams is DEADLINE_EXCEEDED, and it, like an HTTP client that
hangs up, aborts the request in the core: its blocks are freed though the rank's step is held."""

import contextlib
from collections.abc import Iterator

import grpc
import httpx
import pytest

from protos import serving_pb2, serving_pb2_grpc
from scheduler.config import ServerConfig
from scheduler.core.engine_core import EngineCore
from scheduler.frontend.server import FrontendServer
from tests.scheduler.fake_worker import TIMEOUT, FakeRank, successor
from tests.scheduler.frontend.core_fixture import (
    BLOCK_SIZE,
    NUM_BLOCKS,
    blocks_in_use,
    running_core,
    running_frontend,
    wait_until,
)

STALL_AFTER = 4  # tokens (prompt included) after which the stalling rank holds its steps


@pytest.fixture
def rank() -> Iterator[FakeRank]:
    """A fake rank that holds its next step once any request has STALL_AFTER tokens, until
    released (at the latest when the test ends)."""

    def token(tokens: list[int]) -> int:
        if len(tokens) >= STALL_AFTER:
            stalling.hold = True
        return successor(tokens)

    stalling = FakeRank(NUM_BLOCKS, block_size=BLOCK_SIZE, token=token)
    try:
        yield stalling
    finally:
        release(stalling)


def release(rank: FakeRank) -> None:
    rank.hold = False
    rank.release.set()


def generate(max_tokens: int = 40) -> serving_pb2.GenerateRequest:
    msg = serving_pb2.GenerateRequest()
    msg.prompt_token_ids.ids.append(1)
    msg.params.temperature = 0
    msg.params.max_tokens = max_tokens
    return msg


@contextlib.contextmanager
def stub(frontend: FrontendServer) -> Iterator[serving_pb2_grpc.ServingStub]:
    with grpc.insecure_channel(frontend.address) as channel:
        yield serving_pb2_grpc.ServingStub(channel)


def http_url(frontend: FrontendServer) -> str:
    return f"http://127.0.0.1:{frontend.http_port}"


def chat(frontend: FrontendServer, timeout: float = TIMEOUT, **body) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "a"}], **body}
    return httpx.post(f"{http_url(frontend)}/v1/chat/completions", json=body, timeout=timeout)


def refused(call) -> grpc.RpcError:
    """The error a Generate stream ends with (it must end with one)."""
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:
            pass
    return err.value


def requests_in_core(core: EngineCore) -> int:
    [replica] = core.fleet.replicas
    return len(replica.engine.scheduler.requests)


def assert_429(reply: httpx.Response, limit: str) -> None:
    assert reply.status_code == 429, reply.text
    error = reply.json()["error"]
    assert error["type"] == "rate_limit_error" and limit in error["message"]


def served_after(core: EngineCore, rank: FakeRank, frontend: FrontendServer) -> None:
    """Once the rank runs again: no block held, and a request is answered to its end."""
    release(rank)
    wait_until(lambda: blocks_in_use(core) == 0, "every block is free")
    with stub(frontend) as serving:
        last = list(serving.Generate(generate(max_tokens=2), timeout=TIMEOUT))[-1]
    assert last.finish_reason == "length"


def test_a_frontend_refuses_beyond_max_concurrent_requests_at_once(rank, tmp_path):
    config = ServerConfig(port=0, http_port=0, max_concurrent_requests=1)
    with running_core(rank) as core, running_frontend(core, str(tmp_path), config) as frontend:
        with stub(frontend) as serving:
            rank.hold = True
            first = serving.Generate(generate(), timeout=TIMEOUT)
            wait_until(rank.held.is_set, "the first request runs")
            error = refused(serving.Generate(generate(), timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server.max_concurrent_requests=1" in error.details()
            assert_429(chat(frontend), "server.max_concurrent_requests=1")
            assert_429(chat(frontend, stream=True), "server.max_concurrent_requests=1")
            info = serving.GetServerInfo(serving_pb2.ServerInfoRequest(), timeout=TIMEOUT)
            assert [f.num_requests for f in info.frontends] == [1]  # none reached the core
            first.cancel()
            # Until the core has ended the cancelled request, it holds its place.
            wait_until(lambda: frontend.backend.num_admitted == 0, "the core ends the first")
        served_after(core, rank, frontend)


def test_the_core_refuses_beyond_max_queued_requests_from_any_frontend(rank, tmp_path):
    with running_core(rank, max_num_seqs=1, max_queued_requests=1) as core:
        with (
            running_frontend(core, str(tmp_path)) as one,
            running_frontend(core, str(tmp_path)) as other,
            stub(one) as via_one,
            stub(other) as via_other,
        ):
            rank.hold = True
            running = via_one.Generate(generate(), timeout=TIMEOUT)
            wait_until(rank.held.is_set, "the first request runs")
            waiting = via_other.Generate(generate(), timeout=TIMEOUT)
            wait_until(lambda: core.fleet.num_waiting() == 1, "the second request waits")
            error = refused(via_one.Generate(generate(), timeout=TIMEOUT))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "scheduler.max_queued_requests=1" in error.details()
            assert_429(chat(other), "scheduler.max_queued_requests=1")
            assert requests_in_core(core) == 2  # the refused ones were never built
            running.cancel()
            waiting.cancel()
            wait_until(lambda: requests_in_core(core) == 0, "both are aborted")
            served_after(core, rank, one)


def test_deadlines_that_expire_mid_stream_or_waiting_abort_and_free_blocks(rank, tmp_path):
    with (
        running_core(rank, max_num_seqs=1) as core,
        running_frontend(core, str(tmp_path)) as frontend,
        stub(frontend) as serving,
    ):
        streaming = serving.Generate(generate(), timeout=1.0)
        got = [next(streaming)]  # then the rank stalls: the rest waits for the deadline
        wait_until(rank.held.is_set, "the rank holds a step")
        waiting = serving.Generate(generate(), timeout=1.0)
        wait_until(lambda: core.fleet.num_waiting() == 1, "the second request waits")
        assert blocks_in_use(core) > 0
        assert refused(streaming).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert got[0].token_ids and not got[0].finish_reason
        assert refused(waiting).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Aborted in the core while its step is still held: nothing waits on the rank.
        wait_until(lambda: requests_in_core(core) == 0, "both are aborted")
        assert blocks_in_use(core) == 0
        served_after(core, rank, frontend)


def test_an_http_client_that_hangs_up_aborts_its_request(rank, tmp_path):
    with (
        running_core(rank) as core,
        running_frontend(core, str(tmp_path)) as frontend,
    ):
        body = {"model": "fake", "prompt": "a", "max_tokens": 40, "stream": True}
        url = f"{http_url(frontend)}/v1/completions"
        with httpx.stream("POST", url, json=body, timeout=TIMEOUT) as reply:
            assert reply.status_code == 200
            assert next(reply.iter_lines()).startswith("data: ")
        # The rank stalls the stream after its first tokens: only the hang-up ends it.
        wait_until(lambda: requests_in_core(core) == 0, "the streamed request is aborted")
        with pytest.raises(httpx.ReadTimeout):  # unstreamed: the rank still holds its steps
            chat(frontend, timeout=0.5, max_tokens=40)
        wait_until(lambda: requests_in_core(core) == 0, "the unstreamed request is aborted")
        assert blocks_in_use(core) == 0
        served_after(core, rank, frontend)
