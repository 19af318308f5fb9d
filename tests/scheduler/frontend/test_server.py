"""Two frontend servers in this process on one port (SO_REUSEPORT) in front of one engine core
(a fake rank behind it), driven by plain gRPC clients: the Serving API, its errors as status
codes, health (NOT_SERVING while the core's only replica recovers), and an Abort that reaches a
request whichever frontend holds it."""

import collections
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import serving_pb2, serving_pb2_grpc
from scheduler.config import ServerConfig
from scheduler.core.engine_core import EngineCore
from scheduler.frontend import server as server_module
from scheduler.frontend.server import FrontendServer
from tests.scheduler.core.fake_placer import FakePlacer
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import (
    BLOCK_SIZE,
    ENGINE_CONFIGS,
    NUM_BLOCKS,
    PieceTokenizer,
    fake_rank,
    running_core,
    running_frontend,
)


@pytest.fixture(scope="module")
def frontends(tmp_path_factory):
    """The core's address-sharing frontends: (address, [server, server])."""
    metrics_dir = str(tmp_path_factory.mktemp("metrics"))
    with running_core(fake_rank()) as core:
        first = FrontendServer(
            ServerConfig(port=0, http_port=0), [core.address], PieceTokenizer, "fake", metrics_dir
        )
        second = None
        try:
            second = FrontendServer(
                ServerConfig(port=first.port, http_port=first.http_port),
                [core.address],
                PieceTokenizer,
                "fake",
                metrics_dir,
            )
            first.wait_ready(TIMEOUT)
            second.wait_ready(TIMEOUT)
            yield first.address, [first, second]
        finally:
            first.stop()
            if second is not None:
                second.stop()


def stub(address: str) -> tuple[grpc.Channel, serving_pb2_grpc.ServingStub]:
    """A channel with a connection of its own (the kernel picks a frontend for each)."""
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, serving_pb2_grpc.ServingStub(channel)


def generate(prompt=(1,), request_id="", **params) -> serving_pb2.GenerateRequest:
    msg = serving_pb2.GenerateRequest(request_id=request_id)
    msg.params.temperature = 0
    for key, value in params.items():
        setattr(msg.params, key, value)
    msg.prompt_token_ids.ids.extend(prompt)
    return msg


def test_both_frontends_serve_on_one_port(frontends):
    address, servers = frontends
    assert servers[0].port == servers[1].port
    for _ in range(40):
        channel, serving = stub(address)
        with channel:
            got = list(serving.Generate(generate(max_tokens=3), timeout=TIMEOUT))
            info = serving.GetServerInfo(serving_pb2.ServerInfoRequest(), timeout=TIMEOUT)
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="pagedserve.serving.Serving"),
                timeout=TIMEOUT,
            )
        assert [t for r in got for t in r.token_ids] == [2, 3, 4]
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        if all(f.num_requests for f in info.frontends):
            break
    assert len(info.frontends) == 2
    assert all(f.num_requests for f in info.frontends), "one frontend took every connection"


def test_errors_reach_the_client_as_status_codes(frontends):
    address, _ = frontends
    channel, serving = stub(address)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            list(serving.Generate(generate((1, 10)), timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt_token_ids: 10 is outside the vocabulary [0, 10)" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            serving.Scale(serving_pb2.ScaleRequest(replicas=2), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = serving.GetModelInfo(serving_pb2.ModelInfoRequest(), timeout=TIMEOUT)
    assert (info.model, info.vocab_size, info.max_model_len, info.max_num_seqs) == (
        "fake",
        10,
        64,
        8,
    )
    assert list(info.eos_token_ids) == [0]  # the frontend's tokenizer's


def test_abort_finds_a_request_on_any_frontend(frontends):
    address, _ = frontends
    channel, serving = stub(address)
    with channel:
        stream = serving.Generate(generate(request_id="long", max_tokens=60), timeout=TIMEOUT)
        next(stream)
        for _ in range(10):  # through fresh connections: some land on the other frontend
            other, other_serving = stub(address)
            with other:
                found = other_serving.Abort(
                    serving_pb2.AbortRequest(request_id="long"), timeout=TIMEOUT
                ).found
            if found:
                break
        assert found
        assert [r.finish_reason for r in stream][-1] == "abort"


def test_health_is_not_serving_while_no_replica_serves_and_requests_wait_for_one(tmp_path):
    placer = FakePlacer(NUM_BLOCKS, BLOCK_SIZE)
    core = EngineCore("fake")
    try:
        core.start([placer.place(0)], ENGINE_CONFIGS, placer)
        with running_frontend(core, str(tmp_path)) as frontend:
            channel, serving = stub(frontend.address)
            with channel:
                watch = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="pagedserve.serving.Serving"),
                    timeout=TIMEOUT,
                )
                status = health_pb2.HealthCheckResponse
                assert next(watch).status == status.SERVING
                placer.may_place.clear()  # the restart waits
                placer.kill(0)
                assert next(watch).status == status.NOT_SERVING
                call = serving.Generate(generate(max_tokens=3), timeout=TIMEOUT)
                placer.may_place.set()
                assert next(watch).status == status.SERVING
                assert [t for r in call for t in r.token_ids] == [2, 3, 4]
                watch.cancel()
    finally:
        core.stop()
        placer.release(0)


# gRPC's default soft bound on calls a server has not taken yet: with n waiting past it, a new
# call is refused (CANCELLED, no sentence) with chance (n - 1000) / 2000 (its hard bound: 3000).
GRPC_SOFT_PENDING_CALLS = 1000


def test_a_burst_beyond_grpcs_pending_call_bounds_waits_for_a_busy_frontend(frontends):
    """Calls that arrive while the frontend is busy wait in gRPC for it to take them; gRPC's
    default backlog bounds refused a share of a burst past 1000 CANCELLED, unseen by the
    frontend (4096 requests over 16 client connections and 8 frontends on a GPU host). Every
    method's calls wait in the same queue: cheap GetModelInfo calls make the burst here."""
    address, servers = frontends
    # 500 past the soft bound: gRPC's defaults refuse about 60 of them (none by a chance of
    # about e^-60).
    burst = GRPC_SOFT_PENDING_CALLS + 500
    request = serving_pb2.ModelInfoRequest()
    busy = threading.Event()
    channel, serving = stub(address)
    with channel:
        try:
            for server in servers:  # busy, whichever the kernel picks: neither takes a call
                server._loop.call_soon_threadsafe(busy.wait, TIMEOUT)
            calls = [serving.GetModelInfo.future(request, timeout=TIMEOUT) for _ in range(burst)]
        finally:
            busy.set()
        codes = collections.Counter(call.code() for call in calls)
    assert codes == {grpc.StatusCode.OK: burst}, codes


@pytest.mark.parametrize("untaken_s, cancelled", [(1, True), (4, False)])
def test_a_call_waits_up_to_max_untaken_call_s_for_a_busy_frontend_to_take_it(
    tmp_path, monkeypatch, untaken_s, cancelled
):
    """gRPC answers a call the server has not taken in time CANCELLED, unseen by the frontend
    (a burst once met its default, 30 s): the frontend's bound applies instead."""
    monkeypatch.setattr(server_module, "MAX_UNTAKEN_CALL_S", untaken_s)
    with running_core(fake_rank()) as core, running_frontend(core, str(tmp_path)) as frontend:
        frontend._loop.call_soon_threadsafe(time.sleep, 2)  # busy: it takes no call for 2 s
        channel, serving = stub(frontend.address)
        with channel:
            calls = [serving.Generate(generate(max_tokens=2), timeout=TIMEOUT) for _ in range(3)]
            codes = []
            for call in calls:
                try:
                    codes.append(grpc.StatusCode.OK if list(call) else None)
                except grpc.RpcError as e:
                    codes.append(e.code())
    if cancelled:  # gRPC's pending call waited past the bound (one waits taken, not pending)
        assert grpc.StatusCode.CANCELLED in codes, codes
    else:
        assert codes == [grpc.StatusCode.OK] * 3
