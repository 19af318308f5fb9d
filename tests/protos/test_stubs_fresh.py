"""The committed stubs equal a fresh generation from the .proto files, and import."""

from pathlib import Path

from protos.generate import PROTO_DIR, generate


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc wrote nothing"
    for path in fresh:
        committed = PROTO_DIR / path.name
        assert committed.is_file(), f"{committed.name} is not committed: run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed.name} is stale: run `make protos`"
        )


def test_stubs_import() -> None:
    from protos import (
        frontend_pb2,
        frontend_pb2_grpc,
        serving_pb2,
        serving_pb2_grpc,
        worker_pb2,
        worker_pb2_grpc,
    )

    assert serving_pb2_grpc.ServingStub and worker_pb2_grpc.WorkerStub
    assert frontend_pb2_grpc.EngineCoreStub
    assert "Connect" in frontend_pb2.DESCRIPTOR.services_by_name["EngineCore"].methods_by_name
    assert "Generate" in serving_pb2.DESCRIPTOR.services_by_name["Serving"].methods_by_name
    assert "Execute" in worker_pb2.DESCRIPTOR.services_by_name["Worker"].methods_by_name
