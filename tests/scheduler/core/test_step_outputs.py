"""A frontend's share of a step, built whole: tokens by client request id and completion index,
logprobs for every entry once any completion asked for them."""

from protos import serving_pb2
from scheduler.core.request import Request
from scheduler.core.step_outputs import StepOutputsBuilder
from scheduler.sampling_params import SamplingParams


def completions(rid: str, n: int) -> list[Request]:
    request = Request(rid, [1, 2], SamplingParams(temperature=0, n=n), frozenset([0]), 64)
    return [request] + [request.fork(i) for i in range(1, n)]


def logprobs(logprob: float) -> serving_pb2.TokenLogprobs:
    return serving_pb2.TokenLogprobs(entries=[serving_pb2.Logprob(token_id=5, logprob=logprob)])


def test_tokens_go_by_client_request_id_and_completion_index():
    a0, a1 = completions("a", 2)
    [b] = completions("b", 1)
    outputs = StepOutputsBuilder()
    outputs.tokens([a0, b, a1], [5, 6, 7], None)
    message = outputs.build()
    assert list(message.request_ids) == ["a", "b", "a"]
    assert list(message.indices) == [0, 0, 1]
    assert list(message.token_ids) == [5, 6, 7]
    assert not message.logprobs


def test_once_a_completion_asks_for_logprobs_every_entry_has_them_empty_where_not_asked():
    [a], [b], [c] = completions("a", 1), completions("b", 1), completions("c", 1)
    outputs = StepOutputsBuilder()
    outputs.tokens([a], [5], None)
    outputs.tokens([b, c], [6, 7], [logprobs(-0.5), None])
    outputs.tokens([a], [8], [None])
    message = outputs.build()
    empty = serving_pb2.TokenLogprobs()
    assert list(message.logprobs) == [empty, logprobs(-0.5), empty, empty]
    assert list(message.token_ids) == [5, 6, 7, 8]
