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
