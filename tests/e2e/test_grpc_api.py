"""The Serving API seen by a generic gRPC client: only server reflection, no generated stubs."""

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def test_reflection_lists_the_services_and_drives_generate(local_cluster):
    with grpc.insecure_channel(local_cluster.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"pagedserve.serving.Serving", "grpc.health.v1.Health"} <= services
        pool = DescriptorPool(database)
        method = pool.FindServiceByName("pagedserve.serving.Serving").methods_by_name["Generate"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        generate = channel.unary_stream(
            "/pagedserve.serving.Serving/Generate",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        request = request_class(prompt="The capital of France is")
        request.params.temperature = 0.0
        request.params.max_tokens = 4
        responses = list(generate(request, timeout=120))
    assert responses[-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in responses) == 4
    assert "".join(r.text for r in responses)


def test_the_last_message_carries_usage_and_timings(local_cluster):
    from cluster.client import Client
    from scheduler.sampling_params import SamplingParams

    prompt = "A long shared preamble for caching. " * 8 + "Then a question?"
    params = SamplingParams(temperature=0.0, max_tokens=4)
    with Client(local_cluster.address) as client:
        list(client.generate(prompt, params, timeout=120))  # fills the prefix cache
        *_, last = client.generate(prompt, params, timeout=120)
    assert last.finish_reason and last.usage.completion_tokens >= 1
    assert last.usage.cached_tokens >= 32  # the repeat finds its full blocks cached
    assert last.usage.cached_tokens < last.usage.prompt_tokens
    t = last.timings
    assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.total_ms
    assert t.time_to_first_token_ms > 0


def test_final_only_is_one_message_per_completion_with_what_the_stream_carries(local_cluster):
    from cluster.client import Client
    from scheduler.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, n=2, logprobs=1)
    final_only = SamplingParams(**{**vars(params), "output_kind": RequestOutputKind.FINAL_ONLY})
    with Client(local_cluster.address) as client:
        streamed = list(client.generate("Name three colours:", params, timeout=120))
        finals = list(client.generate("Name three colours:", final_only, timeout=120))
    assert sorted(r.index for r in finals) == [0, 1]
    assert all(r.finish_reason == "length" for r in finals)
    for final in finals:
        mine = [r for r in streamed if r.index == final.index]
        assert list(final.token_ids) == [t for r in mine for t in r.token_ids]
        assert len(final.token_ids) == final.usage.completion_tokens == 12
        assert final.text == "".join(r.text for r in mine)
        assert list(final.logprobs) == [p for r in mine for p in r.logprobs]
        assert final.cumulative_logprob == mine[-1].cumulative_logprob


def test_health_turns_serving_only_once_the_model_is_loaded(
    local_cluster, tiny_models, smollm2_path
):
    """While the workers load, the server already answers: NOT_SERVING, and Generate is
    UNAVAILABLE with a reason; then SERVING."""
    import socket
    import threading
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from cluster.config import Config
    from cluster.launcher import Cluster, replace_sections
    from protos import serving_pb2, serving_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path, _ = tiny_models["llama"]
    config = replace_sections(
        Config(),
        model={"model": str(path), "tokenizer": smollm2_path, "max_model_len": 256},
        cache={"num_blocks": 64, "block_size": 8},
        server={"port": port},
    )
    cluster = Cluster(config)
    starter = threading.Thread(target=cluster.start)
    starter.start()
    seen, refused_while_loading = [], None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check
            generate = serving_pb2_grpc.ServingStub(channel).Generate
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                try:
                    status = check(
                        health_pb2.HealthCheckRequest(service="pagedserve.serving.Serving"),
                        timeout=5,
                    ).status
                except grpc.RpcError:  # the actor has not opened its port yet
                    time.sleep(0.05)
                    continue
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                if not seen or seen[-1] != name:
                    seen.append(name)
                if name == "NOT_SERVING" and refused_while_loading is None:
                    try:
                        list(generate(serving_pb2.GenerateRequest(prompt="hi"), timeout=5))
                    except grpc.RpcError as e:
                        refused_while_loading = e
                if name == "SERVING":
                    break
                time.sleep(0.05)
    finally:
        starter.join(timeout=300)
        cluster.shutdown()
    assert seen == ["NOT_SERVING", "SERVING"]
    assert refused_while_loading is not None
    assert refused_while_loading.code() == grpc.StatusCode.UNAVAILABLE
    assert "loading" in refused_while_loading.details()
