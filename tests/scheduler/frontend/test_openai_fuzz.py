"""Property-based fuzzing of the OpenAI-compatible endpoints, in process (Starlette's TestClient
over the app, a scripted Backend behind it): /v1/completions and /v1/chat/completions, streamed
and not, with good bodies whose fields are replaced by random JSON (wrong types, huge and
non-finite numbers, lone surrogates, unknown and missing fields), random JSON documents and
random bytes (bad UTF-8, truncated JSON). Never a 5xx; every refusal is a 4xx with OpenAI's
error JSON, naming the field when one field was changed; a good request is answered after.

Deterministic (derandomized, no example database) and bounded, so CI cannot flake."""

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from scheduler.config import ServerConfig
from scheduler.frontend.metrics import Metrics
from scheduler.frontend.openai_api import make_app
from scheduler.frontend.openai_protocol import ChatCompletionRequest, CompletionRequest
from tests.scheduler.frontend.scripted_backend import MODEL, ScriptedBackend

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GOOD = {
    COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 4},
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
}
# What each endpoint takes, and names it does not.
FIELDS = {
    COMPLETIONS: [*CompletionRequest.model_fields, "echo", "no_such_field"],
    CHAT: [*ChatCompletionRequest.model_fields, "tools", "no_such_field"],
}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.sampled_from([-(2**31), 2**31 - 1, 2**31, 2**63, 2**64, -(10**30), 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["\ud800", "a\udfffb", "", MODEL, "user", "text"]),
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["role", "content", "type", "text", "x"]), children),
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def http(tmp_path_factory):
    metrics = Metrics(MODEL, str(tmp_path_factory.mktemp("metrics")))
    app = make_app(ScriptedBackend(), ServerConfig(http_port=0), metrics)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def post(http: TestClient, path: str, body: bytes) -> tuple[int, dict | str]:
    """The status and the JSON (or text, when streamed) of a POST of body."""
    reply = http.post(path, content=body, headers={"content-type": "application/json"})
    if reply.headers["content-type"].startswith("text/event-stream"):
        return reply.status_code, reply.text
    return reply.status_code, reply.json()


def assert_refusal_or_answer(status: int, answer: dict | str) -> dict | None:
    """A 200, or a 4xx with OpenAI's error JSON; the error's body for a refusal."""
    assert status < 500, answer
    if status == 200:
        if isinstance(answer, str):  # SSE
            assert answer.endswith("data: [DONE]\n\n")
        return None
    assert 400 <= status < 500
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def assert_good_requests_are_answered(http: TestClient) -> None:
    for path, body in GOOD.items():
        for stream in (False, True):
            status, answer = post(http, path, json.dumps({**body, "stream": stream}).encode())
            assert status == 200, answer
            assert ("hi" in answer) if stream else answer["choices"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_good_bodies_with_fields_replaced_are_answered_or_refused_naming_the_field(http, path):
    @FUZZ
    @given(
        st.dictionaries(st.sampled_from(FIELDS[path]), JSON, min_size=1, max_size=3),
        st.sets(st.sampled_from(sorted(GOOD[path])), max_size=1),
    )
    @example({"prompt": [1, 2**40]}, set())
    @example({"prompt": "\ud800"}, set())
    @example({"messages": [{"role": "user", "content": "\ud800"}]}, set())
    @example({"model": "\ud800"}, set())
    @example({"stop": ["a\udfffb"]}, set())
    @example({"stream": True, "n": 3}, set())
    def fuzz(changed: dict, dropped: set[str]):
        body = {**{k: v for k, v in GOOD[path].items() if k not in dropped}, **changed}
        status, answer = post(http, path, json.dumps(body).encode())
        error = assert_refusal_or_answer(status, answer)
        if error is not None and len(changed) == 1 and not dropped:
            [field] = changed
            assert field in (error["param"] or "") or field in error["message"], error

    fuzz()
    assert_good_requests_are_answered(http)


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_any_json_document_or_bytes_as_the_body_is_refused_with_a_4xx(http, path):
    @settings(FUZZ, max_examples=75)
    @given(st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
    @example(b"[" * 5000 + b"]" * 5000)
    @example(b'{"model": "' + MODEL.encode() + b'", "prompt": "\xff\xfe"}')
    @example(json.dumps(GOOD[path]).encode()[:-3])
    def fuzz(body: bytes):
        assert_refusal_or_answer(*post(http, path, body))

    fuzz()
    assert_good_requests_are_answered(http)
