"""What a request's Generate stream amounts to, vLLM's shapes: RequestOutput and its
CompletionOutputs; and the one fold that builds them from the stream's messages (collect).

The Serving API streams messages per completion `index`: each adds tokens and text to its
completion (all of it at once when the request asked for FINAL_ONLY); a completion's last message
carries its finish reason, stop reason, usage, timings and the prompt's token ids. The stream ends
when all n completions have finished. Logprobs leave their wire form here, once.
"""

import copy
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass, field

from protos import serving_pb2
from scheduler.logprobs import Logprob, PositionLogprobs


@dataclass(frozen=True)
class Usage:
    """A completion's token counts."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class Timings:
    """A completion's times on the server, in ms from the request's arrival."""

    queue_ms: float  # to its first admission into a step
    time_to_first_token_ms: float
    total_ms: float  # to its last token


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # when logprobs were asked
    logprobs: list[PositionLogprobs] | None = None  # per token: the sampled one's, then the top k
    finish_reason: str | None = None  # "stop", "length" or "abort"; None while it runs
    stop_reason: int | str | None = None  # the stop token id or string that ended it
    usage: Usage | None = None  # once finished
    timings: Timings | None = None  # once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None  # the text prompt, None for token ids or chat messages
    prompt_token_ids: list[int]  # empty until the server sends them (a completion's end)
    outputs: list[CompletionOutput] = field(default_factory=list)  # in index order
    finished: bool = True


class OutputCollector:
    """Folds one request's Generate messages into its RequestOutput, as they arrive."""

    def __init__(
        self, n: int = 1, prompt: str | None = None, prompt_token_ids: list[int] | None = None
    ) -> None:
        self._output = RequestOutput(
            request_id="",
            prompt=prompt,
            prompt_token_ids=list(prompt_token_ids or []),
            outputs=[CompletionOutput(index=i, text="", token_ids=[]) for i in range(n)],
            finished=False,
        )

    def add(self, msg: serving_pb2.GenerateResponse) -> CompletionOutput:
        """Folds one message in; returns the completion it extended."""
        request = self._output
        if not 0 <= msg.index < len(request.outputs):
            raise ValueError(
                f"index {msg.index} is outside the request's {len(request.outputs)} completions"
            )
        request.request_id = msg.request_id
        out = request.outputs[msg.index]
        out.text += msg.text
        out.token_ids.extend(msg.token_ids)
        if msg.HasField("cumulative_logprob"):  # set on every message when logprobs were asked
            out.logprobs = out.logprobs or []
            out.logprobs.extend(_position(p) for p in msg.logprobs)
            out.cumulative_logprob = msg.cumulative_logprob
        if msg.finish_reason:
            out.finish_reason = msg.finish_reason
            kind = msg.WhichOneof("stop_reason")
            out.stop_reason = None if kind is None else getattr(msg, kind)
            out.usage = Usage(
                msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens
            )
            out.timings = Timings(
                msg.timings.queue_ms, msg.timings.time_to_first_token_ms, msg.timings.total_ms
            )
            request.prompt_token_ids = list(msg.prompt_token_ids)
            request.finished = all(o.finished for o in request.outputs)
        return out

    @property
    def finished(self) -> bool:
        return self._output.finished

    def output(self) -> RequestOutput:
        """The request so far: the collector's own object, which later messages change."""
        return self._output

    def result(self) -> RequestOutput:
        """The finished request, once the stream has ended."""
        if not self.finished:  # the server ends a stream only once every completion has
            raise RuntimeError("the Generate stream ended before every completion finished")
        return self._output

    def snapshot(self) -> RequestOutput:
        """A copy of the request so far, which later messages leave alone."""
        return copy.deepcopy(self._output)


def collect(
    messages: Iterable[serving_pb2.GenerateResponse],
    n: int = 1,
    prompt: str | None = None,
) -> RequestOutput:
    """A whole blocking Generate stream (Client.generate) -> its RequestOutput."""
    collector = OutputCollector(n, prompt)
    for msg in messages:
        collector.add(msg)
    return collector.result()


async def collect_async(
    messages: AsyncIterable[serving_pb2.GenerateResponse],
    n: int = 1,
    prompt: str | None = None,
) -> RequestOutput:
    """A whole asyncio Generate stream (AsyncClient.generate) -> its RequestOutput."""
    collector = OutputCollector(n, prompt)
    async for msg in messages:
        collector.add(msg)
    return collector.result()


def _position(msg: serving_pb2.TokenLogprobs) -> PositionLogprobs:
    return {e.token_id: Logprob(e.logprob, e.rank, e.decoded_token) for e in msg.entries}
