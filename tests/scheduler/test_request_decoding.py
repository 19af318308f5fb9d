"""Bytes that are not a valid request, sent raw to a real frontend (grpc.aio, its Serving
service) and to a real engine core (a thread-pool server, its EngineCore service): every call is
refused INVALID_ARGUMENT naming the message type, and both serve normally afterwards."""

import grpc
import pytest

from protos import serving_pb2
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import fake_rank, running_core, running_frontend

INVALID_UTF8_PROMPT = b"\x12\x02\xff\xfe"  # field 2 (prompt), 2 bytes that are not UTF-8
TRUNCATED = b"\x12\x05ab"  # field 2 announces 5 bytes, 2 follow
TRUNCATED_VARINT = b"\x08\xff"  # field 1, a varint cut short
INVALID_UTF8_ID = b"\x0a\x01\xff"  # field 1 (request_id), not UTF-8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(frontend address, core address)."""
    with running_core(fake_rank()) as core:
        with running_frontend(core, str(tmp_path_factory.mktemp("metrics"))) as frontend:
            yield frontend.address, core.address


def raw_call(channel: grpc.Channel, method: str, payload: bytes, streaming: bool) -> None:
    """Sends payload as the request of method and reads the whole answer."""
    if streaming:
        list(channel.unary_stream(method)(payload, timeout=TIMEOUT))
    else:
        channel.unary_unary(method)(payload, timeout=TIMEOUT)


def assert_refused(channel, method: str, payload: bytes, message: str, streaming=False) -> None:
    with pytest.raises(grpc.RpcError) as err:
        raw_call(channel, method, payload, streaming)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith(f"the request is not a valid {message}: ")


@pytest.mark.parametrize("payload", [INVALID_UTF8_PROMPT, TRUNCATED])
def test_a_generate_request_that_does_not_decode_is_invalid_argument(served, payload):
    address, _ = served
    with grpc.insecure_channel(address) as channel:
        assert_refused(
            channel,
            "/pagedserve.serving.Serving/Generate",
            payload,
            "pagedserve.serving.GenerateRequest",
            streaming=True,
        )
        request = serving_pb2.GenerateRequest()
        request.prompt_token_ids.ids.append(1)
        request.params.max_tokens = 2
        request.params.temperature = 0
        got = list(
            channel.unary_stream(
                "/pagedserve.serving.Serving/Generate",
                request_serializer=serving_pb2.GenerateRequest.SerializeToString,
                response_deserializer=serving_pb2.GenerateResponse.FromString,
            )(request, timeout=TIMEOUT)
        )
    assert got[-1].finish_reason == "length"


@pytest.mark.parametrize(
    "method, payload, message",
    [
        ("Abort", INVALID_UTF8_ID, "AbortRequest"),
        ("Scale", TRUNCATED_VARINT, "ScaleRequest"),
        ("GetModelInfo", TRUNCATED, "ModelInfoRequest"),
        ("GetServerInfo", TRUNCATED, "ServerInfoRequest"),
    ],
)
def test_every_unary_serving_call_refuses_bytes_that_do_not_decode(
    served, method, payload, message
):
    address, _ = served
    with grpc.insecure_channel(address) as channel:
        method = f"/pagedserve.serving.Serving/{method}"
        assert_refused(channel, method, payload, f"pagedserve.serving.{message}")


def test_the_engine_core_refuses_bytes_that_do_not_decode(served):
    _, core_address = served
    with grpc.insecure_channel(core_address) as channel:
        assert_refused(
            channel,
            "/pagedserve.frontend.EngineCore/Abort",
            INVALID_UTF8_ID,
            "pagedserve.frontend.AbortById",
        )
        # A Connect stream whose first message is garbage ends INVALID_ARGUMENT.
        connect = channel.stream_stream("/pagedserve.frontend.EngineCore/Connect")
        with pytest.raises(grpc.RpcError) as err:
            list(connect(iter([TRUNCATED]), timeout=TIMEOUT))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "pagedserve.frontend.FrontendMessage" in err.value.details()
        info = channel.unary_unary(
            "/pagedserve.frontend.EngineCore/GetServerInfo",
            request_serializer=serving_pb2.ServerInfoRequest.SerializeToString,
            response_deserializer=serving_pb2.ServerInfoResponse.FromString,
        )(serving_pb2.ServerInfoRequest(), timeout=TIMEOUT)
    assert len(info.replicas) == 1


def test_streaming_services_behind_the_decoding_still_serve(served):
    """Reflection (a request stream) and health's Watch (a response stream) pass through the
    frontend's decoding interceptor as they are."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    address, _ = served
    with grpc.insecure_channel(address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "pagedserve.serving.Serving" in services
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
