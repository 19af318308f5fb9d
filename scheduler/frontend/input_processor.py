"""A frontend's input side: a Serving GenerateRequest checked and tokenized into the AddRequest
the engine core takes (token ids, the client's sampling parameters, the tokenizer's EOS ids).
Every refusal is a ValueError with a sentence naming the field."""

import uuid

from protos import frontend_pb2, serving_pb2
from scheduler.frontend.tokenizer import Tokenizer
from scheduler.sampling_params import SamplingParams


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def process(
        self, msg: serving_pb2.GenerateRequest
    ) -> tuple[frontend_pb2.AddRequest, SamplingParams]:
        """The request for the core (its id assigned when the client gave none) and its
        parameters, checked; raises ValueError naming the bad field."""
        kind = msg.WhichOneof("input")
        params = SamplingParams.from_proto(msg.params)
        token_ids = self._token_ids(msg, kind)
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"{kind} is {len(token_ids)} tokens long; it must be shorter than "
                f"max_model_len={self.max_model_len}"
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
