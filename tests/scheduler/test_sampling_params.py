import pytest

from scheduler.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": -1}, "seed"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ],
)
def test_bad_values_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_vllm_defaults():
    p = SamplingParams(top_k=-1)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 16)
    assert SamplingParams(temperature=0).greedy and not p.greedy


def test_every_field_crosses_the_wire_and_back():
    import dataclasses

    from protos import serving_pb2
    from scheduler import sampling_params as sp

    wire = {*sp._WIRE_OPTIONAL, *sp._WIRE_PLAIN, *sp._WIRE_REPEATED}
    assert wire == {f.name for f in dataclasses.fields(SamplingParams)}
    assert wire == set(serving_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    # Values exact in float32, the wire's float.
    params = SamplingParams(
        temperature=0.5,
        top_p=0.75,
        top_k=40,
        max_tokens=32,
        stop_token_ids=[7, 9],
        ignore_eos=True,
        seed=2**63 + 1,
        skip_special_tokens=False,
        n=3,
        min_p=0.125,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.25,
        min_tokens=4,
        stop=["\n\n", "END"],
        include_stop_str_in_output=True,
        logprobs=5,
    )
    assert SamplingParams.from_proto(params.to_proto()) == params


def test_no_max_tokens_crosses_the_wire_as_no_limit_not_the_default():
    params = SamplingParams(max_tokens=None)
    assert params.to_proto().HasField("max_tokens")
    assert SamplingParams.from_proto(params.to_proto()).max_tokens is None


def test_unset_wire_fields_take_the_defaults_and_bad_ones_name_the_field():
    from protos import serving_pb2

    assert SamplingParams.from_proto(serving_pb2.SamplingParams()) == SamplingParams()
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams.from_proto(serving_pb2.SamplingParams(logprobs=21))
