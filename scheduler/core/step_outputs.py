"""What the engine core sends a frontend: its requests' share of a step, as one StepOutputs
message (protos/frontend.proto), built here and nowhere else.

    step N learned:   a: +17   b: +4 (finished, length)   c: +9      (a, b from frontend 1)
    frontend 1 gets:  StepOutputs(request_ids=[a, b], indices=[0, 0], token_ids=[17, 4],
                                  finished=[Finished(b, "length", usage, timings)])
"""

import time
from collections.abc import Sequence

import grpc

from protos import frontend_pb2, serving_pb2
from scheduler.core.request import Request


class StepOutputsBuilder:
    """Collects one frontend's outputs of one step (tokens, then ends) into one message."""

    def __init__(self) -> None:
        self._request_ids: list[str] = []
        self._indices: list[int] = []
        # The token ids as given, a sequence per call: a StepResult's own repeated field is
        # copied into the message in C, a list value by value (50 ns each).
        self._token_ids: list[Sequence[int]] = []
        # One entry per token once any token carries logprobs (an empty one where not asked).
        self._logprobs: list[serving_pb2.TokenLogprobs] = []
        self._finished: list[frontend_pb2.Finished] = []

    def tokens(
        self,
        requests: list[Request],
        tokens: Sequence[int],
        logprobs: list[serving_pb2.TokenLogprobs | None] | None,
    ) -> None:
        """Tokens the completions learned in this step, one each, in order, and their logprobs
        (None: no completion asked; else one entry each, None where not asked)."""
        self._request_ids += [request.group_id for request in requests]
        self._indices += [request.index for request in requests]
        self._token_ids.append(tokens)
        if logprobs is not None and any(lps is not None for lps in logprobs):
            missing = len(self._request_ids) - len(tokens) - len(self._logprobs)
            self._logprobs.extend(serving_pb2.TokenLogprobs() for _ in range(missing))
            empty = serving_pb2.TokenLogprobs
            self._logprobs += [empty() if lps is None else lps for lps in logprobs]
        elif self._logprobs:
            self._logprobs.extend(serving_pb2.TokenLogprobs() for _ in tokens)

    def finished(self, request: Request) -> None:
        """The completion ended (after its tokens in this message)."""
        self._finished.append(finished(request))

    def failed(self, request_id: str, code: grpc.StatusCode, message: str) -> None:
        """The client request ended unanswered: refused, or lost with a failed replica."""
        self._finished.append(failure(request_id, code, message))

    def build(self) -> frontend_pb2.StepOutputs:
        outputs = frontend_pb2.StepOutputs(
            request_ids=self._request_ids,
            indices=self._indices,
            logprobs=self._logprobs,
            finished=self._finished,
        )
        for tokens in self._token_ids:
            outputs.token_ids.extend(tokens)
        return outputs


def finished(request: Request) -> frontend_pb2.Finished:
    """A finished completion's end: its reason, usage and timings."""
    msg = frontend_pb2.Finished(
        request_id=request.group_id,
        index=request.index,
        finish_reason=request.finish_reason,
        usage=serving_pb2.Usage(
            prompt_tokens=request.num_prompt_tokens,
            completion_tokens=len(request.output_token_ids),
            cached_tokens=request.num_cached_tokens,
        ),
        timings=serving_pb2.Timings(
            queue_ms=_since(request.arrival_time, request.first_scheduled_time),
            time_to_first_token_ms=_since(request.arrival_time, request.first_token_time),
            total_ms=_since(request.arrival_time, time.monotonic()),
        ),
    )
    if isinstance(request.stop_reason, str):
        msg.stop_str = request.stop_reason
    elif request.stop_reason is not None:
        msg.stop_token_id = request.stop_reason
    return msg


def failure(request_id: str, code: grpc.StatusCode, message: str) -> frontend_pb2.Finished:
    """The end of a client request that gets no answer, with the status its client is told."""
    return frontend_pb2.Finished(
        request_id=request_id,
        finish_reason="abort",
        error=frontend_pb2.Error(code=code.value[0], message=message),
    )


def _since(start: float, end: float | None) -> float:
    """Milliseconds from start to end (0 when end never came: an abort before it)."""
    return 0.0 if end is None else (end - start) * 1e3
