"""One completion as a frontend streams it to its client: the core's token ids in, Serving
GenerateResponses out, with incremental text, stop strings and logprobs.

    receive(token, logprobs)*   the tokens of one or more core messages (a client that fell
                                behind gets them merged into one response)
    detokenize() -> stop str    text for them; a stop string ends the completion here: later
                                tokens are dropped, and the caller tells the core
    finish(Finished)            the core ended it (its usage and timings)
    response() -> message       what the client has not been sent (DELTA), or all of it once
                                ended (FINAL_ONLY); None when there is nothing to send
"""

from collections.abc import Callable

from protos import frontend_pb2, serving_pb2
from scheduler.frontend.completion_text import CompletionText
from scheduler.frontend.tokenizer import Tokenizer
from scheduler.sampling_params import RequestOutputKind, SamplingParams


class CompletionStream:
    def __init__(
        self,
        request_id: str,
        index: int,
        params: SamplingParams,
        tokenizer: Tokenizer,
        token_text: Callable[[int], str],
    ) -> None:
        self.request_id = request_id
        self.index = index
        self._text = CompletionText(tokenizer, params)
        self._token_text = token_text  # a token's own text, for logprobs' decoded_token
        self._final_only = params.output_kind is RequestOutputKind.FINAL_ONLY
        self._logprobs = params.logprobs is not None
        self._one_by_one = bool(params.stop)  # a stop string ends it at the token that made it
        self._received: list[tuple[int, serving_pb2.TokenLogprobs | None]] = []
        self._token_ids: list[int] = []  # accepted, not sent
        self._positions: list[serving_pb2.TokenLogprobs] = []  # their logprobs, when asked
        self.num_tokens = 0  # accepted in all
        self._cumulative_logprob = 0.0
        self.stop_str: str | None = None  # the stop string its text reached
        self.finished: frontend_pb2.Finished | None = None
        self.sent_last = False

    @property
    def open(self) -> bool:
        """Still takes tokens: neither stopped by its text nor ended by the core."""
        return self.stop_str is None and self.finished is None

    def receive(self, token: int, logprobs: serving_pb2.TokenLogprobs | None) -> None:
        if self.open:
            self._received.append((token, logprobs))

    def detokenize(self) -> str | None:
        """Turns the received tokens into text; returns the stop string they reached, if any
        (the tokens after the one that reached it are dropped)."""
        received, self._received = self._received, []
        if not received:
            return None
        if self._one_by_one:
            for k, (token, _) in enumerate(received):
                if (stop := self._text.add([token])) is not None:
                    self._accept(received[: k + 1])
                    self.stop_str = stop
                    return stop
        else:
            self._text.add([token for token, _ in received])
        self._accept(received)
        return None

    def _accept(self, received: list[tuple[int, serving_pb2.TokenLogprobs | None]]) -> None:
        for token, logprobs in received:
            self._token_ids.append(token)
            if self._logprobs and logprobs is not None:
                for entry in logprobs.entries:
                    entry.decoded_token = self._token_text(entry.token_id)
                self._positions.append(logprobs)
                self._cumulative_logprob += logprobs.entries[0].logprob
        self.num_tokens += len(received)

    def finish(self, finished: frontend_pb2.Finished) -> None:
        """The core ended the completion (after every token received)."""
        self.finished = finished
        self._text.finish()

    def response(self, prompt_token_ids: list[int]) -> serving_pb2.GenerateResponse | None:
        """What the client is sent now, if anything; the last one carries the end."""
        done = self.finished is not None
        if self.sent_last or (not done and (self._final_only or not self._token_ids)):
            return None
        msg = serving_pb2.GenerateResponse(
            request_id=self.request_id,
            token_ids=self._token_ids,
            text=self._text.take(done),
            index=self.index,
            logprobs=self._positions,
        )
        if self._logprobs:
            msg.cumulative_logprob = self._cumulative_logprob
        self._token_ids, self._positions = [], []
        if done:
            self._finish_fields(msg, prompt_token_ids)
            self.sent_last = True
        return msg

    def _finish_fields(
        self, msg: serving_pb2.GenerateResponse, prompt_token_ids: list[int]
    ) -> None:
        finished = self.finished
        msg.prompt_token_ids.extend(prompt_token_ids)
        msg.usage.CopyFrom(finished.usage)
        msg.usage.completion_tokens = self.num_tokens  # none past a stop string
        msg.timings.CopyFrom(finished.timings)
        if self.stop_str is not None:  # whatever else ended it on that token, as vLLM does
            msg.finish_reason, msg.stop_str = "stop", self.stop_str
            return
        msg.finish_reason = finished.finish_reason
        kind = finished.WhichOneof("stop_reason")
        if kind is not None:
            setattr(msg, kind, getattr(finished, kind))
