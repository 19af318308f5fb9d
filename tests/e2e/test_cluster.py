"""The whole path on the embedded default: Ray actors, gRPC, the paged KV cache, HF parity."""

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cluster.client import Client
from scheduler.sampling_params import SamplingParams
from tests.conftest import PARITY_PROMPTS

TIMEOUT = 300


def _collect(stream):
    tokens, text, last = [], [], None
    for delta in stream:
        tokens.extend(delta.token_ids)
        text.append(delta.text)
        last = delta
    return tokens, "".join(text), last


def _chat_ids(tokenizer, prompt):
    out = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(out, add_special_tokens=False)


def test_greedy_matches_hf_generate_through_the_cluster(local_cluster, hf_smollm2):
    """8 prompts x 32 tokens, submitted together (batched), token-identical to HF."""
    hf, tokenizer = hf_smollm2
    prompts = [
        _chat_ids(tokenizer, p) if i % 2 == 0 else tokenizer.encode(p)
        for i, p in enumerate(PARITY_PROMPTS)
    ]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    with Client(local_cluster.address) as client:
        streams = [client.generate(ids, params, timeout=TIMEOUT) for ids in prompts]
        results = [_collect(s) for s in streams]
    for ids, (tokens, _, last) in zip(prompts, results, strict=True):
        input_ids = torch.tensor([ids])
        with torch.no_grad():  # an explicit mask: HF would mask <|im_end|>, its pad token
            ref = hf.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=32,
                do_sample=False,
            )
        assert tokens == ref[0, len(ids) :].tolist()
        assert last.finish_reason == "length"
        assert last.usage.completion_tokens == 32 and last.usage.prompt_tokens == len(ids)


def test_chat_prompt_streams_text(local_cluster):
    with Client(local_cluster.address) as client:
        assert client.health() == "SERVING"
        tokens, text, last = _collect(
            client.generate(
                [{"role": "user", "content": "What is the capital of France?"}],
                SamplingParams(temperature=0.0, max_tokens=40),
                timeout=TIMEOUT,
            )
        )
    assert "Paris" in text
    assert last.finish_reason == "stop" and tokens[-1] == 2  # <|im_end|>


def test_new_requests_join_running_ones(local_cluster):
    """B and C arrive while A decodes; the step records show them batched with A, and each
    output equals the same request run alone."""
    params = {
        "A": SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
        "B": SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        "C": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
    }
    prompts = {"A": "The history of Rome", "B": "Water boils at", "C": "My favourite colour is"}
    together = {}
    with Client(local_cluster.address) as client:
        stream_a = client.generate(prompts["A"], params["A"], request_id="join-A", timeout=TIMEOUT)
        first = next(stream_a)  # A is running now
        later = {
            name: client.generate(
                prompts[name], params[name], request_id=f"join-{name}", timeout=TIMEOUT
            )
            for name in ("B", "C")
        }
        for name, stream in later.items():
            together[name] = _collect(stream)[0]
        rest = _collect(stream_a)[0]
        together["A"] = list(first.token_ids) + rest
        alone = {
            name: _collect(client.generate(prompts[name], params[name], timeout=TIMEOUT))[0]
            for name in prompts
        }
    records = local_cluster.step_records()
    joins = [r for r in records if {"join-B", "join-C"} & set(r["new_request_ids"])]
    assert joins, "B and C never entered a step"
    assert all("join-A" in r["scheduled"] for r in joins), "B/C did not join A's batch"
    assert together == alone


@pytest.mark.parametrize(
    "request_kwargs,field",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [0] * 9000}, "max_model_len"),
        ({"prompt": "hi", "params": SamplingParams(max_tokens=2)}, None),  # valid: control
        ({"prompt": "hi", "temperature": -1.0}, "temperature"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": [70000]}, "prompt_token_ids"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs"),
        ({"prompt": "hi", "logprobs": -1}, "logprobs"),
        ({"prompt": "hi", "stop": ["ok", ""]}, "stop"),
    ],
)
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(
    local_cluster, request_kwargs, field
):
    from cluster.client import make_request
    from protos import serving_pb2_grpc

    prompt = request_kwargs["prompt"]
    msg = make_request(prompt, request_kwargs.get("params", SamplingParams(max_tokens=2)))
    # Raw wire values, as a non-Python client could send them (SamplingParams would refuse).
    for key in ("temperature", "top_p", "max_tokens", "logprobs"):
        if key in request_kwargs:
            setattr(msg.params, key, request_kwargs[key])
    msg.params.stop.extend(request_kwargs.get("stop", []))
    with grpc.insecure_channel(local_cluster.address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        if field is None:
            assert list(stub.Generate(msg, timeout=TIMEOUT))[-1].finish_reason
        else:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(msg, timeout=TIMEOUT))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in err.value.details()
        # still serving
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pagedserve.serving.Serving"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with Client(local_cluster.address) as client:
        assert _collect(client.generate("ok", SamplingParams(max_tokens=2), timeout=TIMEOUT))[2]


def test_abort_by_id_and_server_info(local_cluster):
    with Client(local_cluster.address) as client:
        stream = client.generate(
            "Count to a thousand",
            SamplingParams(max_tokens=2000, ignore_eos=True),
            request_id="to-abort",
            timeout=TIMEOUT,
        )
        next(stream)
        assert client.abort("to-abort")
        _, _, last = _collect(stream)
        assert last.finish_reason == "abort"
        assert not client.abort("to-abort")
        info = client.server_info()
        assert info.model == "smollm2-135m-instruct" and info.num_steps > 0
        assert client.model_info().max_model_len == 8192
