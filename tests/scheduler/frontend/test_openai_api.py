"""The OpenAI-compatible HTTP API on a real uvicorn server, over a scripted Backend: the official
openai client for what succeeds, raw httpx for error shapes and disconnects."""

import asyncio
import contextlib
import json
import socket

import grpc
import httpx
import openai
import pytest

from protos import serving_pb2
from scheduler.config import ServerConfig
from scheduler.frontend.backend import ServingError
from scheduler.frontend.http_server import HttpServer
from scheduler.frontend.metrics import Metrics
from scheduler.frontend.openai_api import make_app
from scheduler.sampling_params import WIRE_NO_MAX_TOKENS
from tests.scheduler.frontend.scripted_backend import HOLD, MODEL, ScriptedBackend, delta, last

WAIT_S = 10.0


@contextlib.contextmanager
def serving(backend: ScriptedBackend, metrics_dir, **server):
    config = ServerConfig(http_port=0, **server)
    http = HttpServer(make_app(backend, config, Metrics(MODEL, str(metrics_dir))), config)
    http.start()
    try:
        yield http.url
    finally:
        http.stop()


def client(url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=WAIT_S)


def logprob(token_id: int, text: str, lp: float, rank: int) -> serving_pb2.Logprob:
    return serving_pb2.Logprob(token_id=token_id, logprob=lp, rank=rank, decoded_token=text)


def test_chat_unstreamed_sends_the_fields_and_returns_the_completion(tmp_path):
    backend = ScriptedBackend(
        lambda r: [last(0, [5, 6, 7], "Paris.", prompt_tokens=9, completion_tokens=3)]
    )
    with serving(backend, tmp_path) as url:
        answer = client(url).chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
            ],
            temperature=0.5,
            top_p=0.9,
            max_completion_tokens=7,
            seed=3,
            stop=["\n"],
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            user="someone",
            extra_body={"top_k": 5, "repetition_penalty": 1.1},
        )
    (request,) = backend.requests
    assert [(m.role, m.content) for m in request.messages.messages] == [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
    ]
    p = request.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed) == pytest.approx(
        (0.5, 0.9, 5, 7, 3)
    )
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == pytest.approx(
        (0.5, -0.5, 1.1)
    )
    assert list(p.stop) == ["\n"] and not p.HasField("logprobs")
    assert p.output_kind == serving_pb2.FINAL_ONLY
    assert request.request_id == answer.id and answer.id.startswith("chatcmpl-")
    assert answer.model == MODEL and answer.object == "chat.completion"
    (choice,) = answer.choices
    assert (choice.message.role, choice.message.content) == ("assistant", "Paris.")
    assert choice.finish_reason == "stop" and choice.logprobs is None
    usage = answer.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (9, 3, 12)


def test_chat_streamed_with_usage(tmp_path):
    backend = ScriptedBackend(
        lambda r: [
            delta(0, [1], "Par"),
            delta(0, [2], ""),  # tokens whose text is held back: no chunk
            last(0, [3], "is", finish_reason="length", prompt_tokens=5, completion_tokens=3),
        ]
    )
    with serving(backend, tmp_path) as url:
        chunks = list(
            client(url).chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Capital of France?"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    (request,) = backend.requests
    assert request.params.output_kind == serving_pb2.DELTA
    assert request.params.max_tokens == WIRE_NO_MAX_TOKENS  # a chat's default: unbounded
    *content, usage = chunks
    assert [c.choices[0].delta.content for c in content] == ["Par", "is"]
    assert content[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in content] == [None, "length"]
    assert all(c.object == "chat.completion.chunk" and c.id == request.request_id for c in chunks)
    assert usage.choices == [] and (usage.usage.prompt_tokens, usage.usage.total_tokens) == (5, 8)


def test_completion_n2_logprobs_stop(tmp_path):
    def script(request):
        return [
            last(
                index,
                [10 + index, 20],
                text,
                completion_tokens=2,
                stop_str="x",
                logprobs=[
                    serving_pb2.TokenLogprobs(
                        entries=[logprob(10 + index, text[0], -0.5, 2), logprob(9, "z", -0.2, 1)]
                    ),
                    serving_pb2.TokenLogprobs(entries=[logprob(20, text[1], -0.1, 1)]),
                ],
            )
            for index, text in ((1, "ab"), (0, "cd"))
        ]

    backend = ScriptedBackend(script)
    with serving(backend, tmp_path) as url:
        answer = client(url).completions.create(
            model=MODEL, prompt="Say", n=2, logprobs=1, stop="x", max_tokens=5
        )
    (request,) = backend.requests
    assert request.prompt == "Say"
    p = request.params
    assert (p.n, p.logprobs, list(p.stop), p.max_tokens) == (2, 1, ["x"], 5)
    assert [c.text for c in answer.choices] == ["cd", "ab"]
    first = answer.choices[0]
    assert first.logprobs.tokens == ["c", "d"]
    assert first.logprobs.token_logprobs == pytest.approx([-0.5, -0.1])
    assert first.logprobs.top_logprobs == [{"z": pytest.approx(-0.2)}, {"d": pytest.approx(-0.1)}]
    assert first.logprobs.text_offset == [0, 1]
    assert first.finish_reason == "stop" and first.model_extra["stop_reason"] == "x"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (4, 4)


def test_completion_streamed_from_token_ids(tmp_path):
    backend = ScriptedBackend(lambda r: [delta(0, [1], "a"), last(0, [2], "b")])
    with serving(backend, tmp_path) as url:
        chunks = list(client(url).completions.create(model=MODEL, prompt=[[1, 2, 3]], stream=True))
    (request,) = backend.requests
    assert list(request.prompt_token_ids.ids) == [1, 2, 3]
    assert not request.params.HasField("max_tokens")  # a completion's default: 16
    assert [c.choices[0].text for c in chunks] == ["a", "b"]
    assert [c.choices[0].finish_reason for c in chunks] == [None, "stop"]


def test_completion_streamed_n2_keeps_each_choice_apart(tmp_path):
    backend = ScriptedBackend(
        lambda r: [
            delta(1, [1], "x"),
            delta(0, [2], "a"),
            last(1, [3], "y", completion_tokens=2),
            last(0, [4], "b", finish_reason="length", completion_tokens=2),
        ]
    )
    with serving(backend, tmp_path) as url:
        chunks = list(
            client(url).completions.create(
                model=MODEL, prompt="hi", n=2, stream=True, stream_options={"include_usage": True}
            )
        )
    *content, usage = chunks
    texts = {0: "", 1: ""}
    for chunk in content:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
    assert texts == {0: "ab", 1: "xy"}
    assert [(c.choices[0].index, c.choices[0].finish_reason) for c in content[2:]] == [
        (1, "stop"),
        (0, "length"),
    ]
    assert usage.usage.completion_tokens == 4


def test_null_fields_take_their_defaults(tmp_path):
    nulls = dict.fromkeys(
        ("n", "temperature", "stop", "seed", "presence_penalty", "min_tokens", "stream", "user")
    )
    backend = ScriptedBackend()
    with serving(backend, tmp_path) as url:
        answer = _post(url, "/v1/chat/completions", {**CHAT, **nulls, "logprobs": None})
    assert answer.status_code == 200, answer.text
    p = backend.requests[0].params
    assert not any(p.HasField(name) for name in ("n", "temperature", "seed", "logprobs"))
    assert (list(p.stop), p.presence_penalty, p.min_tokens) == ([], 0, 0)
    assert p.output_kind == serving_pb2.FINAL_ONLY


def batch_script(request):
    """Completion i of prompt "pN" answers "pN/i" in two messages."""
    word = request.prompt or "t"
    return [
        message
        for i in range(request.params.n)
        for message in (
            delta(i, [1], f"{word}/"),
            last(i, [2], str(i), prompt_tokens=len(word), completion_tokens=2),
        )
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_a_batch_of_prompts_answers_prompt_by_prompt(tmp_path, stream):
    backend = ScriptedBackend(batch_script)
    with serving(backend, tmp_path) as url:
        answer = client(url).completions.create(
            model=MODEL, prompt=["p0", "p01", [5, 6]], n=2, stream=stream, max_tokens=3,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        )  # fmt: skip
        if stream:
            *chunks, usage_chunk = list(answer)
            texts = {}
            for chunk in chunks:
                (choice,) = chunk.choices
                texts[choice.index] = texts.get(choice.index, "") + choice.text
            usage = usage_chunk.usage
        else:
            texts = {c.index: c.text for c in answer.choices}
            usage = answer.usage
    assert texts == {0: "p0/0", 1: "p0/1", 2: "p01/0", 3: "p01/1", 4: "t/0", 5: "t/1"}
    assert (usage.prompt_tokens, usage.completion_tokens) == (2 + 3 + 1, 12)
    named = {r.request_id: r.prompt or list(r.prompt_token_ids.ids) for r in backend.requests}
    (request_id,) = {name.rsplit("-", 1)[0] for name in named}
    assert named == {f"{request_id}-0": "p0", f"{request_id}-1": "p01", f"{request_id}-2": [5, 6]}
    assert all(r.params.max_tokens == 3 and r.params.n == 2 for r in backend.requests)


def test_a_batch_fails_as_its_first_failing_prompt_and_closes_the_others(tmp_path):
    failure = ServingError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests in flight")
    backend = ScriptedBackend(lambda r: [failure] if r.prompt == "b" else [HOLD])
    with serving(backend, tmp_path) as url:
        answer = _post(url, "/v1/completions", {**COMPLETION, "prompt": ["a", "b", "c"]})
        assert _error(answer, 429)["message"] == failure.message
        assert backend.wait_closed(3, WAIT_S)


def test_chat_logprobs(tmp_path):
    entries = [logprob(3, "Hi", -0.3, 1), logprob(4, "Yo", -1.5, 2)]
    backend = ScriptedBackend(
        lambda r: [last(0, [3], "Hi", logprobs=[serving_pb2.TokenLogprobs(entries=entries)])]
    )
    with serving(backend, tmp_path) as url:
        answer = client(url).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], logprobs=True,
            top_logprobs=2,
        )  # fmt: skip
    assert backend.requests[0].params.logprobs == 2
    (token,) = answer.choices[0].logprobs.content
    assert (token.token, token.bytes) == ("Hi", list(b"Hi"))
    assert [(t.token, t.logprob) for t in token.top_logprobs] == [
        ("Hi", pytest.approx(-0.3)),
        ("Yo", pytest.approx(-1.5)),
    ]


def test_models_and_health(tmp_path):
    with serving(ScriptedBackend(), tmp_path) as url:
        (model,) = client(url).models.list().data
        assert (model.id, model.model_extra["max_model_len"]) == (MODEL, 2048)
        assert httpx.get(f"{url}/health").status_code == 200
    with serving(ScriptedBackend(ready=False), tmp_path) as url:
        answer = httpx.get(f"{url}/health")
        assert answer.status_code == 503
        assert answer.json()["error"]["type"] == "service_unavailable_error"


def test_metrics_show_what_was_served_and_the_core_state(tmp_path):
    info = serving_pb2.ServerInfoResponse(replicas=[serving_pb2.ReplicaInfo(num_running=1)])
    with serving(ScriptedBackend(server_info=info), tmp_path) as url:
        client(url).completions.create(model=MODEL, prompt="hi")
        list(client(url).completions.create(model=MODEL, prompt="hi", stream=True))
        text = httpx.get(f"{url}/metrics").text
    assert f'pagedserve:time_to_first_token_seconds_count{{model_name="{MODEL}"}} 2.0' in text
    assert f'pagedserve:num_requests_running{{model_name="{MODEL}"}} 1.0' in text


def test_metrics_without_the_core_state(tmp_path):
    with serving(ScriptedBackend(server_info=None), tmp_path) as url:
        answer = httpx.get(f"{url}/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    assert "pagedserve:num_requests_running" not in answer.text


def _post(url: str, path: str, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=WAIT_S, **kwargs)


def _error(answer: httpx.Response, status: int) -> dict:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": MODEL, "prompt": "hi"}


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {**CHAT, "temperature": -1}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "top_p": 2}, "top_p"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
        ("/v1/chat/completions", {**CHAT, "presence_penalty": 5}, "presence_penalty"),
        ("/v1/chat/completions", {**CHAT, "seed": -1}, "seed"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "stream_options": {}}, "stream_options"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "tools": []}, "tools"),
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
        ),
        ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": ["one", ""]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {**COMPLETION, "prompt": {"text": "a"}}, "prompt"),
        ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs"),
        ("/v1/completions", {**COMPLETION, "stop": ["x", ""]}, "stop"),
        ("/v1/completions", {**COMPLETION, "echo": True}, "echo"),
        ("/v1/completions", {**COMPLETION, "max_tokens": 2**40}, "max_tokens"),
        ("/v1/completions", {**COMPLETION, "max_tokens": -1}, "max_tokens"),  # not "unset"
        ("/v1/chat/completions", {**CHAT, "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    ],
)
def test_bad_fields_are_400_naming_the_field(tmp_path, path, body, param):
    backend = ScriptedBackend()
    with serving(backend, tmp_path) as url:
        error = _error(_post(url, path, body), 400)
    assert error["param"] == param and param.split(".")[0] in error["message"]
    assert error["type"] == "invalid_request_error"
    assert not backend.requests


def test_a_max_tokens_past_the_context_is_for_the_backend_to_refuse(tmp_path):
    """The backend alone knows the prompt's length: the API asks it to refuse a max_tokens
    past the context (400) rather than run to its end (CoreBackend's test refuses it)."""
    backend = ScriptedBackend()
    with serving(backend, tmp_path) as url:
        _post(url, "/v1/completions", {**COMPLETION, "prompt": ["one", "two"]})
        _post(url, "/v1/chat/completions", CHAT)
    assert backend.refusing == [True, True, True]


def test_a_body_that_is_not_json_is_400(tmp_path):
    with serving(ScriptedBackend(), tmp_path) as url:
        error = _error(_post(url, "/v1/completions", "{not json"), 400)
    assert "JSON" in error["message"]


def test_a_body_over_max_request_bytes_is_413_and_one_of_no_length_411(tmp_path):
    with serving(ScriptedBackend(), tmp_path, max_request_bytes=1024) as url:
        _error(_post(url, "/v1/completions", {**COMPLETION, "prompt": "x" * 1024}), 413)
        chunked = httpx.post(
            f"{url}/v1/completions", content=iter([json.dumps(COMPLETION).encode()])
        )
        _error(chunked, 411)
        assert _post(url, "/v1/completions", COMPLETION).status_code == 200


def test_tokens(tmp_path):
    with serving(ScriptedBackend(), tmp_path, auth_tokens=("s3cret",)) as url:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            error = _error(_post(url, "/v1/completions", COMPLETION, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        answer = client(url, api_key="s3cret").completions.create(model=MODEL, prompt="hi")
        assert answer.choices[0].text == "hi"
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert httpx.get(f"{url}/health").status_code == 200  # open, as gRPC's health
        assert httpx.get(f"{url}/metrics").status_code == 200


def test_requests_are_their_token_s_and_an_admin_s_are_anyone_s(tmp_path):
    backend = ScriptedBackend()
    tokens = {"auth_tokens": ("alice", "bob"), "admin_tokens": ("root",)}
    with serving(backend, tmp_path, **tokens) as url:
        for token in ("alice", "bob", "alice", "root"):
            headers = {"authorization": f"Bearer {token}"}
            assert _post(url, "/v1/completions", COMPLETION, headers=headers).status_code == 200
    alice, bob, alice_again, root = backend.owners
    assert alice == alice_again and len({alice, bob}) == 2 and "alice" not in alice
    assert root == ""  # an admin's abort finds any request


def test_unknown_model_and_route_are_404(tmp_path):
    with serving(ScriptedBackend(), tmp_path) as url:
        error = _error(_post(url, "/v1/completions", {**COMPLETION, "model": "gpt-4"}), 404)
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        with pytest.raises(openai.NotFoundError):
            client(url).chat.completions.create(model="gpt-4", messages=CHAT["messages"])
        _error(httpx.get(f"{url}/v1/nothing"), 404)


@pytest.mark.parametrize(
    "code,status",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_backend_refusal_keeps_its_status(tmp_path, code, status, stream):
    refusal = ServingError(code, "prompt is 5000 tokens long; it must be shorter")
    with serving(ScriptedBackend(lambda r: [refusal]), tmp_path) as url:
        answer = _post(url, "/v1/completions", {**COMPLETION, "stream": stream})
    assert _error(answer, status)["message"] == refusal.message


def test_a_backend_that_breaks_is_500_in_openai_json(tmp_path):
    def broken(request):
        raise RuntimeError("a bug")

    with serving(ScriptedBackend(broken), tmp_path) as url:
        error = _error(_post(url, "/v1/completions", COMPLETION), 500)
    assert (error["message"], error["type"]) == ("the server failed: RuntimeError", "server_error")


def test_a_failure_mid_stream_is_an_error_event(tmp_path):
    failure = ServingError(grpc.StatusCode.UNAVAILABLE, "replica 0 failed")
    backend = ScriptedBackend(lambda r: [delta(0, [1], "a"), failure])
    with serving(backend, tmp_path) as url:
        answer = _post(url, "/v1/completions", {**COMPLETION, "stream": True})
    events = [line.removeprefix("data: ") for line in answer.text.split("\n\n") if line]
    assert answer.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["text"] == "a"
    error = json.loads(events[-2])["error"]
    assert (error["message"], error["type"]) == (failure.message, "service_unavailable_error")


@pytest.mark.parametrize("prompt", ["one", ["one", "batch"]])
def test_a_client_gone_mid_stream_closes_the_backend_streams(tmp_path, prompt):
    backend = ScriptedBackend(lambda r: [delta(0, [1], "a"), HOLD])
    with serving(backend, tmp_path) as url, httpx.Client(timeout=WAIT_S) as http:
        body = {**COMPLETION, "prompt": prompt, "stream": True}
        with http.stream("POST", f"{url}/v1/completions", json=body) as answer:
            first = next(answer.iter_lines())
            assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "a"
            assert backend.holding.wait(WAIT_S)
        assert backend.wait_closed(1 if isinstance(prompt, str) else len(prompt), WAIT_S)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_gone_before_the_answer_closes_the_backend_stream(tmp_path, stream):
    backend = ScriptedBackend(lambda r: [HOLD])
    with serving(backend, tmp_path) as url:
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({**COMPLETION, "stream": stream}).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nhost: {host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
            sock.sendall(head.encode() + body)
            assert backend.holding.wait(WAIT_S)
        assert backend.closed.wait(WAIT_S)


def test_a_streamed_response_ended_before_its_events_closes_the_backend_stream(tmp_path):
    """The client goes between the first message and the response's first byte: Starlette runs
    the response's background task without iterating its events, and that task has closed the
    backend stream by the time the app returns (plain ASGI: the client's disconnect comes once
    the response starts, and the response's start never completes)."""
    backend = ScriptedBackend(lambda r: [delta(0, [1], "a"), HOLD])
    app = make_app(backend, ServerConfig(), Metrics(MODEL, str(tmp_path)))
    body = json.dumps({**COMPLETION, "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
    }

    async def main() -> bool:
        started, asked = asyncio.Event(), []

        async def receive() -> dict:
            asked.append(True)
            if len(asked) == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            await started.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                started.set()
                await asyncio.Event().wait()  # the client is gone: this never completes

        await asyncio.wait_for(app(scope, receive, send), WAIT_S)
        return backend.closed.is_set()  # before the loop turns again

    assert asyncio.run(main())
