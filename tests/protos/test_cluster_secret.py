"""The cluster secret's check (protos/cluster_secret.py) on a worker's server: a worker started
with the secret serves only calls that carry it; any other call, unary or streaming, is refused
UNAUTHENTICATED before its handler runs; the engine core's client, given the secret, is served.
(The engine core's own server: tests/scheduler/core/test_engine_core.py.)"""

import grpc
import pytest

from protos import worker_pb2, worker_pb2_grpc
from protos.cluster_secret import METADATA_KEY
from scheduler.core.worker_client import WorkerClient
from worker.worker import WorkerServer

SECRET = "s3cret-of-this-cluster"


@pytest.fixture(scope="module")
def server():
    server = WorkerServer(secret=SECRET)
    yield server
    server.stop()


@pytest.mark.parametrize(
    "metadata, why",
    [
        ((), f"lacks {METADATA_KEY}"),
        (((METADATA_KEY, "another-secret"),), "not this cluster's secret"),
        (((METADATA_KEY, SECRET[:-1]),), "not this cluster's secret"),
        ((("authorization", f"Bearer {SECRET}"),), f"lacks {METADATA_KEY}"),
    ],
)
def test_a_call_without_the_secret_is_refused_before_its_handler(server, metadata, why):
    with grpc.insecure_channel(server.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as unary:
            stub.Shutdown(worker_pb2.Empty(), metadata=metadata, timeout=10)
        stream = stub.Execute(iter([worker_pb2.StepPlan(step_id=1)]), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as streaming:
            next(stream)
    for err in (unary, streaming):
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert why in err.value.details()
    assert not server.shutdown_requested.is_set(), "a refused Shutdown ran"


def test_raw_bytes_without_the_secret_are_refused_undecoded(server):
    with grpc.insecure_channel(server.address) as channel:
        load = channel.unary_unary("/pagedserve.worker.Worker/LoadModel")
        with pytest.raises(grpc.RpcError) as err:
            load(b"\xff\xff not a message", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_core_client_with_the_secret_is_served(server):
    client = WorkerClient(server.address, SECRET)
    try:
        assert client.wait_until_up(timeout=10).ready is False  # up, no model yet
        with pytest.raises(grpc.RpcError) as err:  # past the check: the handler answers
            client.call("ProfileMemory", worker_pb2.ProfileMemoryRequest(block_size=8)).result()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        client.close()
