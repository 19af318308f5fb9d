"""The engine core's gRPC server serves its cluster's frontends only: started with the cluster
secret, it refuses every call without it (or with another) UNAUTHENTICATED before decoding a
byte of it, and goes on serving the frontend that carries it."""

import grpc
import pytest

from protos import frontend_pb2, serving_pb2
from protos.cluster_secret import METADATA_KEY
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import fake_rank, running_core, running_frontend
from tests.scheduler.frontend.test_server import generate, stub

SECRET = "s3cret-of-this-cluster"
SERVICE = "/pagedserve.frontend.EngineCore"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(the frontend's address, the core's address); the frontend carries the secret."""
    with running_core(fake_rank(), secret=SECRET) as core:
        metrics = str(tmp_path_factory.mktemp("metrics"))
        with running_frontend(core, metrics, core_secret=SECRET) as frontend:
            yield frontend.address, core.address


def unary(channel: grpc.Channel, method: str, request, response_type):
    return channel.unary_unary(
        f"{SERVICE}/{method}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )


@pytest.mark.parametrize(
    "metadata, why",
    [
        ((), f"the engine core serves its cluster's frontends only: the call lacks {METADATA_KEY}"),
        (((METADATA_KEY, SECRET[:-1]),), f"{METADATA_KEY}: not this cluster's secret"),
    ],
)
def test_a_caller_without_the_secret_is_refused_and_the_core_serves_on(served, metadata, why):
    frontend_address, core_address = served
    calls = [
        ("GetServerInfo", serving_pb2.ServerInfoRequest(), serving_pb2.ServerInfoResponse),
        ("Abort", frontend_pb2.AbortById(request_id="any"), serving_pb2.AbortResponse),
        ("Scale", serving_pb2.ScaleRequest(replicas=0), serving_pb2.ScaleResponse),
    ]
    errors = []
    with grpc.insecure_channel(core_address) as channel:
        for method, request, response_type in calls:
            with pytest.raises(grpc.RpcError) as err:
                unary(channel, method, request, response_type)(
                    request, metadata=metadata, timeout=TIMEOUT
                )
            errors.append(err.value)
        # A Connect stream, its first message not even a valid one: refused, never decoded.
        connect = channel.stream_stream(f"{SERVICE}/Connect")
        with pytest.raises(grpc.RpcError) as err:
            list(connect(iter([b"\xff\xff not a message"]), metadata=metadata, timeout=TIMEOUT))
        errors.append(err.value)
    assert [(e.code(), e.details()) for e in errors] == [
        (grpc.StatusCode.UNAUTHENTICATED, why)
    ] * len(errors)
    channel, serving = stub(frontend_address)
    with channel:
        got = list(serving.Generate(generate(max_tokens=3), timeout=TIMEOUT))
    assert [t for delta in got for t in delta.token_ids] == [2, 3, 4]
    assert got[-1].finish_reason == "length"
    with grpc.insecure_channel(core_address) as channel:
        info = unary(channel, *calls[0])(
            calls[0][1], metadata=((METADATA_KEY, SECRET),), timeout=TIMEOUT
        )
    assert len(info.replicas) == 1 and info.num_finished_requests >= 1
