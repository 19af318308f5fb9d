"""The OpenAI wire format at the HTTP boundary: request bodies in, serving_pb2 messages out, and
back. Everything past this module speaks serving.proto; nothing before it does.

    CompletionRequest / ChatCompletionRequest --to_generate_requests--> GenerateRequest
        (one per prompt: a completion body may hold a batch of them)
    GenerateResponse streams --ResponseBuilder--> OpenAI JSON (one response, or SSE chunks)

Sampling fields keep OpenAI's names and defaults (a completion's max_tokens is 16, a chat's is
unbounded); vLLM's extensions are accepted beside them (top_k, min_p, repetition_penalty,
min_tokens, stop_token_ids, ignore_eos). Values are checked by scheduler.sampling_params, so
HTTP and gRPC refuse the same values with the same sentences; an error names the OpenAI field.
"""

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from protos import serving_pb2
from scheduler.frontend.tokenizer import CHAT_ROLES
from scheduler.sampling_params import WIRE_NO_MAX_TOKENS, SamplingParams


class InvalidField(ValueError):
    """A request value refused at the boundary (HTTP 400); param is the OpenAI field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _encodable(text: str) -> str:
    """JSON may escape a lone surrogate (\\ud800), which no UTF-8 string holds: refused."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
    return text


# A string the wire (protobuf, UTF-8) can carry.
Text = Annotated[str, AfterValidator(_encodable)]
_TOKEN_ID_LIMIT = 2**31  # prompt token ids travel as int32


def _joined_text(content: Any) -> Any:
    """A message's content as one string: OpenAI's text parts are joined; other parts refused."""
    if not isinstance(content, list):
        return content
    texts = []
    for part in content:
        if not (isinstance(part, dict) and part.get("type") == "text" and "text" in part):
            raise ValueError('only text parts ({"type": "text", "text": ...}) are supported')
        texts.append(part["text"])
    return "".join(texts)


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def _prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's prompt forms as a list of prompts: a string, a list of token ids, or a list of
    several of these (a batch: each prompt's completions are choices of the one response)."""
    if isinstance(prompt, str) or (_is_token_ids(prompt) and prompt):
        prompts = [prompt]
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or _is_token_ids(p) for p in prompt)
    ):
        prompts = prompt
    else:
        raise ValueError(
            "must be a string, a list of token ids, or a non-empty list of several of these"
        )
    for i, one in enumerate(prompts):
        if not one:
            raise ValueError("must not be empty" if len(prompts) == 1 else f"prompt {i} is empty")
        if isinstance(one, str):
            _encodable(one)
        elif not all(-_TOKEN_ID_LIMIT <= t < _TOKEN_ID_LIMIT for t in one):
            raise ValueError("a token id is out of range")
    return prompts


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with no choices and the request's usage


class _SamplingRequest(BaseModel):
    """The fields completions and chat completions share. Unknown fields are refused; null is
    the default, as OpenAI's schema allows it for every optional field."""

    model_config = ConfigDict(extra="forbid")

    model: Text
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    min_p: float | None = None  # vLLM's extension
    max_tokens: int | None = None
    stop: Annotated[list[Text] | None, BeforeValidator(_as_list)] = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extension
    min_tokens: int | None = None  # vLLM's extension
    ignore_eos: bool | None = None  # vLLM's extension
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: Text | None = None  # OpenAI's end-user id: accepted, unused


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions."""

    prompt: Annotated[list[str | list[int]], BeforeValidator(_prompts)]
    logprobs: int | None = None  # the sampled token's and the top k, per position

    def top_logprobs_k(self) -> int | None:
        """How many alternatives per position to return; None: no logprobs."""
        return self.logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal[CHAT_ROLES]
    content: Annotated[str, BeforeValidator(_joined_text), AfterValidator(_encodable)]
    name: Text | None = None  # OpenAI's participant name: accepted, unused


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None  # OpenAI's newer name of max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None  # with logprobs: how many alternatives per position

    def top_logprobs_k(self) -> int | None:
        """How many alternatives per position to return; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


def to_generate_requests(
    body: CompletionRequest | ChatCompletionRequest, request_id: str
) -> list[serving_pb2.GenerateRequest]:
    """The GenerateRequests a body asks for, one per prompt (a chat has one; the requests of a
    batch are named request_id-0, request_id-1, ...); raises InvalidField naming the bad field.

    Streamed requests take deltas (OutputKind DELTA); the others one message per completion
    (FINAL_ONLY)."""
    if body.stream_options is not None and not body.stream:
        raise InvalidField("stream_options", "stream_options: only allowed with stream=true")
    for name in ("max_tokens", "max_completion_tokens"):  # -1 is the wire's "unset"
        if (value := getattr(body, name, None)) is not None and value < 1:
            raise InvalidField(name, f"{name} must be at least 1, got {value}")
    msg = serving_pb2.GenerateRequest(request_id=request_id)
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise InvalidField("top_logprobs", "top_logprobs: needs logprobs=true")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise InvalidField(
                "max_completion_tokens",
                "max_tokens and max_completion_tokens: give one (max_tokens is its old name)",
            )
        msg.messages.messages.extend(
            serving_pb2.ChatMessage(role=m.role, content=m.content) for m in body.messages
        )
        if body.max_completion_tokens is not None:
            max_tokens = ("max_completion_tokens", body.max_completion_tokens)
        else:  # a chat completion runs to the end of the context unless told otherwise
            unset = body.max_tokens is None
            max_tokens = ("max_tokens", WIRE_NO_MAX_TOKENS if unset else body.max_tokens)
        logprobs = ("top_logprobs", body.top_logprobs_k())
    else:
        max_tokens = ("max_tokens", body.max_tokens)
        logprobs = ("logprobs", body.top_logprobs_k())
    # proto field -> (the OpenAI field it came from, its value; None = unset).
    wire = {
        name: (name, getattr(body, name))
        for name in (
            "n",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "min_tokens",
            "ignore_eos",
        )
    }
    wire["max_tokens"] = max_tokens
    wire["logprobs"] = logprobs
    params = msg.params
    for name, (param, value) in wire.items():
        if value is None:
            continue
        try:
            setattr(params, name, value)
        except (ValueError, TypeError):  # outside the wire type's range (int32, uint64)
            raise InvalidField(param, f"{param}: {value} is out of range") from None
    for name in ("stop", "stop_token_ids"):
        try:
            getattr(params, name).extend(getattr(body, name) or ())
        except (ValueError, TypeError):
            raise InvalidField(name, f"{name}: a value is out of range") from None
    params.output_kind = serving_pb2.DELTA if body.stream else serving_pb2.FINAL_ONLY
    try:
        SamplingParams.from_proto(params)
    except ValueError as e:  # its sentences begin with the field's name
        name = str(e).split(" ", 1)[0]
        param = wire.get(name, (name,))[0]
        raise InvalidField(param, str(e) if param == name else f"{param}: {e}") from None
    if isinstance(body, ChatCompletionRequest):
        return [msg]
    requests = []
    for i, prompt in enumerate(body.prompt):
        one = serving_pb2.GenerateRequest()
        one.CopyFrom(msg)
        if len(body.prompt) > 1:
            one.request_id = f"{request_id}-{i}"
        if isinstance(prompt, str):
            one.prompt = prompt
        else:
            one.prompt_token_ids.ids.extend(prompt)
        requests.append(one)
    return requests


def _finish_reason(msg: serving_pb2.GenerateResponse) -> str | None:
    return msg.finish_reason or None


def _stop_reason(msg: serving_pb2.GenerateResponse) -> str | int | None:
    """vLLM's stop_reason: the stop string or token id that ended the completion."""
    kind = msg.WhichOneof("stop_reason")
    return None if kind is None else getattr(msg, kind)


def _top(position: serving_pb2.TokenLogprobs, k: int) -> list[serving_pb2.Logprob]:
    """The k most likely tokens at a position (the sampled one among them if its rank is <= k)."""
    return sorted(position.entries, key=lambda e: e.rank)[:k]


def _chat_token(entry: serving_pb2.Logprob) -> dict:
    token = entry.decoded_token
    return {"token": token, "logprob": entry.logprob, "bytes": list(token.encode())}


@dataclass
class _Choice:
    """One completion as received so far."""

    text: list[str] = field(default_factory=list)
    logprobs: list[serving_pb2.TokenLogprobs] = field(default_factory=list)
    text_offset: int = 0  # characters of this completion's tokens sent so far (completions)
    started: bool = False  # a chunk has gone out for it (chat: the one naming the role)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ResponseBuilder:
    """Turns one body's GenerateResponses into OpenAI JSON, for /v1/completions (chat=False)
    or /v1/chat/completions (chat=True): chunk() for each streamed message, or add() every
    message and then response(). A message comes with the position of its prompt in the body
    (0 but in a batch); the choice it extends is prompt * n + its completion index, as OpenAI
    numbers a batch's choices. top_logprobs is the k of logprobs asked for (None: none)."""

    def __init__(
        self, request_id: str, model: str, chat: bool, n: int, top_logprobs: int | None
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.chat = chat
        self.n = n
        self.top_logprobs = top_logprobs
        self.created = int(time.time())
        self.choices: dict[int, _Choice] = {}
        self.prompt_tokens: dict[int, int] = {}  # by prompt
        self.cached_tokens: dict[int, int] = {}  # by prompt
        self.completion_tokens = 0

    def _update(self, msg: serving_pb2.GenerateResponse, prompt: int) -> tuple[int, _Choice]:
        index = prompt * self.n + msg.index
        choice = self.choices.setdefault(index, _Choice())
        if msg.finish_reason:
            choice.finish_reason = _finish_reason(msg)
            choice.stop_reason = _stop_reason(msg)
            self.prompt_tokens[prompt] = msg.usage.prompt_tokens
            self.cached_tokens[prompt] = msg.usage.cached_tokens
            self.completion_tokens += msg.usage.completion_tokens
        return index, choice

    def _logprobs_json(
        self, positions: list[serving_pb2.TokenLogprobs], text_offset: int
    ) -> dict | None:
        k = self.top_logprobs
        if k is None:
            return None
        if self.chat:
            content = [
                {**_chat_token(p.entries[0]), "top_logprobs": [_chat_token(e) for e in _top(p, k)]}
                for p in positions
            ]
            return {"content": content}
        tokens = [p.entries[0].decoded_token for p in positions]
        offsets = []
        for token in tokens:
            offsets.append(text_offset)
            text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [p.entries[0].logprob for p in positions],
            "top_logprobs": [{e.decoded_token: e.logprob for e in _top(p, k)} for p in positions],
            "text_offset": offsets,
        }

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.request_id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage(self) -> dict:
        """The body's usage: every prompt's tokens, and every completion's."""
        prompt_tokens = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(self.cached_tokens.values())},
        }

    def chunk(self, msg: serving_pb2.GenerateResponse, prompt: int = 0) -> dict | None:
        """The SSE chunk for one streamed message (None when it carries nothing to send)."""
        index, choice = self._update(msg, prompt)
        logprobs = self._logprobs_json(list(msg.logprobs), choice.text_offset)
        choice.text_offset += sum(len(p.entries[0].decoded_token) for p in msg.logprobs)
        if not (msg.text or msg.logprobs or msg.finish_reason or not choice.started):
            return None
        if self.chat:
            delta = {"content": msg.text}
            if not choice.started:
                delta["role"] = "assistant"
            body = {"index": index, "delta": delta}
        else:
            body = {"index": index, "text": msg.text}
        choice.started = True
        body.update(
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )
        return self._envelope([body], chunk=True)

    def usage_chunk(self) -> dict:
        """stream_options.include_usage's last chunk: no choices, the whole body's usage."""
        return {**self._envelope([], chunk=True), "usage": self.usage()}

    def add(self, msg: serving_pb2.GenerateResponse, prompt: int = 0) -> None:
        """Takes one message of an unstreamed body."""
        _, choice = self._update(msg, prompt)
        choice.text.append(msg.text)
        choice.logprobs.extend(msg.logprobs)

    def response(self) -> dict:
        """The unstreamed response, once every message has been added."""
        choices = []
        for index, choice in sorted(self.choices.items()):
            text = "".join(choice.text)
            body: dict = {"index": index}
            if self.chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["text"] = text
            body.update(
                logprobs=self._logprobs_json(choice.logprobs, 0),
                finish_reason=choice.finish_reason,
                stop_reason=choice.stop_reason,
            )
            choices.append(body)
        return {**self._envelope(choices, chunk=False), "usage": self.usage()}
