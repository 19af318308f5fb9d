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
