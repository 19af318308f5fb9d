"""A frontend's input side: a Serving GenerateRequest checked and tokenized into the AddRequest
the engine core takes (token ids, the client's sampling parameters, the tokenizer's EOS ids).
Every refusal is a ValueError with a sentence naming the field.

Every field whose size the wire leaves open (up to the request's byte limit, or 2**31 - 1) is
bounded here, before anything is built for the request: the frontend's detokenizer and the core
pay per step for stop strings and stop token ids, the core for each of n completions and
request ids and cache salts travel with every output.
"""

import math
import uuid

from protos import frontend_pb2, serving_pb2
from scheduler.frontend.tokenizer import Tokenizer
from scheduler.sampling_params import SamplingParams

MAX_REQUEST_ID_CHARS = 256
MAX_CACHE_SALT_CHARS = 256
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


class InputProcessor:
    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, max_num_seqs: int
    ) -> None:
        """max_num_seqs: the core's scheduler.max_num_seqs, the largest n it takes."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs

    def process(
        self, msg: serving_pb2.GenerateRequest, refuse_past_context: bool = False
    ) -> tuple[frontend_pb2.AddRequest, SamplingParams]:
        """The request for the core (its id assigned when the client gave none) and its
        parameters, checked; raises ValueError naming the bad field. A max_tokens past
        max_model_len less the prompt ends at max_model_len (finish_reason "length", as vLLM's
        offline LLM has it), or with refuse_past_context is refused (as vLLM's OpenAI server)."""
        kind = msg.WhichOneof("input")
        self._check_sizes(msg)
        params = SamplingParams.from_proto(msg.params)
        token_ids = self._token_ids(msg, kind)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"{kind} is {len(token_ids)} tokens long; it must be shorter than "
                f"max_model_len={self.max_model_len}"
            )
        room = self.max_model_len - len(token_ids)
        if refuse_past_context and params.max_tokens is not None and params.max_tokens > room:
            raise ValueError(
                f"max_tokens={params.max_tokens} is too large: the {kind} is {len(token_ids)} "
                f"tokens long and max_model_len={self.max_model_len}, which leaves at most "
                f"{room} new tokens (or leave max_tokens unset: up to max_model_len)"
            )
        add = frontend_pb2.AddRequest(
            request_id=msg.request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            params=msg.params,
            priority=msg.priority,
            cache_salt=msg.cache_salt,
            eos_token_ids=sorted(self.tokenizer.eos_token_ids),
        )
        return add, params

    def _check_sizes(self, msg: serving_pb2.GenerateRequest) -> None:
        """Refuses a field beyond its bound, before the parameters are built."""
        for name, limit in (
            ("request_id", MAX_REQUEST_ID_CHARS),
            ("cache_salt", MAX_CACHE_SALT_CHARS),
        ):
            if len(getattr(msg, name)) > limit:
                raise ValueError(f"{name} must be at most {limit} characters long")
        params = msg.params
        if params.HasField("n") and params.n > self.max_num_seqs:
            raise ValueError(
                f"n={params.n} completions exceed scheduler.max_num_seqs={self.max_num_seqs}, "
                "the requests one step can hold"
            )
        if len(params.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings, got {len(params.stop)}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in params.stop):
            raise ValueError(f"stop: a string must be at most {MAX_STOP_STRING_CHARS} characters")
        stop_ids = params.stop_token_ids
        if len(stop_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, got {len(stop_ids)}"
            )
        if any(t >= self.vocab_size for t in stop_ids):
            raise ValueError(
                f"stop_token_ids: {max(stop_ids)} is outside the vocabulary [0, {self.vocab_size})"
            )
        for name in ("temperature", "repetition_penalty"):
            if params.HasField(name) and not math.isfinite(getattr(params, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(params, name)}")

    def _token_ids(self, msg: serving_pb2.GenerateRequest, kind: str | None) -> list[int]:
        vocab = self.vocab_size
        if kind is None:
            raise ValueError("prompt: one of prompt, prompt_token_ids or messages is required")
        if kind == "prompt":
            if not msg.prompt:
                raise ValueError("prompt must not be empty")
            token_ids = self.tokenizer.encode(msg.prompt)
        elif kind == "prompt_token_ids":
            token_ids = list(msg.prompt_token_ids.ids)
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"prompt_token_ids: {bad[0]} is outside the vocabulary [0, {vocab})"
                )
        else:
            messages = [{"role": m.role, "content": m.content} for m in msg.messages.messages]
            if not messages:
                raise ValueError("messages must not be empty")
            token_ids = self.tokenizer.apply_chat_template(messages)
        if not token_ids:
            raise ValueError(f"{kind} must not be empty")
        if kind != "prompt_token_ids" and max(token_ids) >= vocab:
            raise ValueError(
                f"{kind}: the tokenizer gave token id {max(token_ids)}, outside the model's "
                f"vocabulary [0, {vocab}); model.tokenizer does not match the model"
            )
        return token_ids
