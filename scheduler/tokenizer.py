"""Tokenizer and incremental detokenizer (HF tokenizers; no model weights are touched)."""

import os
from typing import Any


class Tokenizer:
    """Wraps the HF tokenizer of a GGUF file or an HF directory."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        if path.endswith(".gguf"):
            directory, name = os.path.split(os.path.abspath(path))
            self._tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        else:
            self._tok = AutoTokenizer.from_pretrained(path)
        eos = self._tok.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos])
        self.vocab_size = len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tok.chat_template)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Renders the messages with the model's template, ready for the assistant's turn."""
        if not self.has_chat_template:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        text = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window (prefix_offset .. end) and emits only what follows the text of
    (prefix_offset .. read_offset), holding back output that ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Appends tokens; returns the new text they complete (possibly empty)."""
        self.token_ids.extend(token_ids)
        decode = self.tokenizer.decode
        prefix = decode(
            self.token_ids[self._prefix_offset : self._read_offset], self.skip_special_tokens
        )
        full = decode(self.token_ids[self._prefix_offset :], self.skip_special_tokens)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        delta = full[len(prefix) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The text still held back at the end of the request."""
        full = self.tokenizer.decode(self.token_ids, self.skip_special_tokens)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        return delta
