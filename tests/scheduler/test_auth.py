"""Bearer tokens and the admin role on a real frontend in front of a real engine core (one fake
rank): client tokens serve requests but not Scale (PERMISSION_DENIED), admin tokens serve both,
a call without an accepted token is UNAUTHENTICATED before its bytes are even decoded, the HTTP
API takes both kinds, and a client aborts only its own requests (an admin any)."""

import grpc
import httpx
import pytest

from protos import serving_pb2, serving_pb2_grpc
from scheduler.config import ServerConfig
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import fake_rank, running_core, running_frontend

CLIENT, OTHER, ADMIN = "client-token", "other-client-token", "admin-token"


@pytest.fixture(scope="module")
def rank():
    return fake_rank()


@pytest.fixture(scope="module")
def frontend(tmp_path_factory, rank):
    config = ServerConfig(port=0, http_port=0, auth_tokens=(CLIENT, OTHER), admin_tokens=(ADMIN,))
    with running_core(rank) as core:
        with running_frontend(core, str(tmp_path_factory.mktemp("metrics")), config) as server:
            yield server


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def request(request_id: str = "", max_tokens: int = 2) -> serving_pb2.GenerateRequest:
    msg = serving_pb2.GenerateRequest(request_id=request_id)
    msg.prompt_token_ids.ids.append(1)
    msg.params.max_tokens = max_tokens
    return msg


def generate(serving: serving_pb2_grpc.ServingStub, token: str) -> str:
    stream = serving.Generate(request(), metadata=bearer(token), timeout=TIMEOUT)
    return list(stream)[-1].finish_reason


def scale_code(serving: serving_pb2_grpc.ServingStub, token: str) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        serving.Scale(serving_pb2.ScaleRequest(replicas=2), metadata=bearer(token), timeout=TIMEOUT)
    return err.value.code(), err.value.details()


def test_scale_needs_an_admin_token_and_admin_tokens_serve_requests_too(frontend):
    with grpc.insecure_channel(frontend.address) as channel:
        serving = serving_pb2_grpc.ServingStub(channel)
        assert generate(serving, CLIENT) == generate(serving, ADMIN) == "length"
        code, details = scale_code(serving, CLIENT)
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert "Scale needs an admin token (server.admin_tokens)" in details
        # The admin's call passes authentication and reaches the core, which cannot place.
        assert scale_code(serving, ADMIN)[0] == grpc.StatusCode.FAILED_PRECONDITION
        assert scale_code(serving, "stolen")[0] == grpc.StatusCode.UNAUTHENTICATED


def test_bytes_without_a_token_are_unauthenticated_before_they_are_decoded(frontend):
    with grpc.insecure_channel(frontend.address) as channel:
        call = channel.unary_stream("/pagedserve.serving.Serving/Generate")
        with pytest.raises(grpc.RpcError) as err:
            list(call(b"\x12\x05ab", timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            list(call(b"\x12\x05ab", metadata=bearer(CLIENT), timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_http_api_takes_client_and_admin_tokens(frontend):
    url = f"http://127.0.0.1:{frontend.http_port}/v1/models"
    for token, status in ((CLIENT, 200), (ADMIN, 200), ("stolen", 401)):
        reply = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=TIMEOUT)
        assert reply.status_code == status, token


def test_admin_tokens_are_checked_naming_the_key():
    with pytest.raises(ValueError, match="server.admin_tokens must differ from server.auth"):
        ServerConfig(auth_tokens=("same",), admin_tokens=("same",))
    with pytest.raises(ValueError, match="server.admin_tokens must be non-empty strings"):
        ServerConfig(admin_tokens=("has space",))


@pytest.mark.parametrize("aborter", [CLIENT, ADMIN], ids=["its-submitter", "an-admin"])
def test_a_client_aborts_only_its_own_requests(frontend, rank, aborter):
    with grpc.insecure_channel(frontend.address) as channel:
        serving = serving_pb2_grpc.ServingStub(channel)
        rank.held.clear()
        rank.release.clear()
        rank.hold = True  # the request's first step waits: the core holds it
        try:
            stream = serving.Generate(
                request("mine", max_tokens=40), metadata=bearer(CLIENT), timeout=TIMEOUT
            )
            assert rank.held.wait(TIMEOUT)
            mine = serving_pb2.AbortRequest(request_id="mine")
            assert not serving.Abort(mine, metadata=bearer(OTHER), timeout=TIMEOUT).found
            assert serving.Abort(mine, metadata=bearer(aborter), timeout=TIMEOUT).found
        finally:
            rank.hold = False
            rank.release.set()
        assert list(stream)[-1].finish_reason == "abort"
