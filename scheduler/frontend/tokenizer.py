"""Tokenizer and incremental detokenizer (HF tokenizers; no model weights are touched)."""

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# The roles a chat message may take (OpenAI's, but tool calls: none is supported).
CHAT_ROLES = ("system", "developer", "user", "assistant")


class Tokenizer:
    """Wraps the HF tokenizer of a GGUF file or an HF directory."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        if path.endswith(".gguf"):
            self._tok = _gguf_tokenizer(path)
        else:
            self._tok = AutoTokenizer.from_pretrained(path)
        eos = self._tok.eos_token_id
        self.eos_token_ids = frozenset([] if eos is None else [eos])
        self.vocab_size = len(self._tok)
        # The tokenizers library's own tokenizer, where decode() adds nothing to what it returns
        # (no clean-up of spaces): decode() calls it directly and its DecodeStream streams text
        # (decode_stream()).
        fast = getattr(self._tok, "is_fast", False)
        cleans_up = getattr(self._tok, "clean_up_tokenization_spaces", False)
        self._backend = self._tok.backend_tokenizer if fast and not cleans_up else None

    @property
    def has_chat_template(self) -> bool:
        return bool(self._tok.chat_template)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Renders the messages with the model's template, ready for the assistant's turn."""
        if not self.has_chat_template:
            raise ValueError("messages: this model has no chat template; send a prompt instead")
        for i, message in enumerate(messages):
            if message["role"] not in CHAT_ROLES:
                raise ValueError(
                    f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                    f"got {message['role']!r}"
                )
        from jinja2 import TemplateError

        try:
            text = self._tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        except TemplateError as e:  # the template's own raise_exception(): roles out of order...
            raise ValueError(f"messages: the model's chat template refused them: {e}") from None
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:  # what transformers' decode returns, without its overhead
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool) -> Callable[[list[int]], str | None] | None:
        """A new stream of one sequence's text: a function taking its next token ids and
        returning the text they complete (None while a character is incomplete), the tokenizers
        library's DecodeStream; None where decode() is not the library's own (the tokenizer
        cleans up spaces, or is not a fast one)."""
        if self._backend is None:
            return None
        from tokenizers.decoders import DecodeStream

        stream, backend = DecodeStream(skip_special_tokens=skip_special_tokens), self._backend
        return lambda token_ids: stream.step(backend, token_ids)


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas; the text streamed is always a
    prefix of decode(token_ids) (output that ends in an incomplete character is held back).

    With the tokenizers library's own tokenizer, its incremental decoder (DecodeStream,
    Tokenizer.decode_stream); else decodes a short window (prefix_offset .. end) and emits only
    what follows the text of (prefix_offset .. read_offset).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self._stream = tokenizer.decode_stream(skip_special_tokens)
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> str:
        """Appends tokens; returns the new text they complete (possibly empty)."""
        self.token_ids.extend(token_ids)
        if self._stream is not None:
            delta = (self._stream(token_ids) or "") if token_ids else ""
            self.text += delta
            return delta
        skip = self.skip_special_tokens
        prefix = self.tokenizer.decode(
            self.token_ids[self._prefix_offset : self._read_offset], skip
        )
        full = self.tokenizer.decode(self.token_ids[self._prefix_offset :], skip)
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


def _gguf_tokenizer(path: str) -> Any:
    """The HF tokenizer of a GGUF file. transformers converts it from the file's vocabulary and
    merges (SmolLM2's: 9 s of GGUF parsing and more of conversion on the 2-core CI machine, at
    every frontend's start), so the result is kept in the cache directory, in HF's own format,
    under a key of the file (path, size, modification time) and the transformers version:
    later loads take a fraction of a second. No cache where none can be written."""
    from transformers import AutoTokenizer

    cache = _cache_dir() / "tokenizers" / _gguf_key(path)
    if cache.is_dir():  # only ever complete: written elsewhere, then renamed into place
        return AutoTokenizer.from_pretrained(cache)
    directory, name = os.path.split(os.path.abspath(path))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(dir=cache.parent)
        tok.save_pretrained(staging)
        try:
            os.rename(staging, cache)
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as e:
        log.warning("the tokenizer of %s is not cached: %s", path, e)
    return tok


def _cache_dir() -> Path:
    """$PAGEDSERVE_CACHE_DIR, else pagedserve/ under $XDG_CACHE_HOME (~/.cache)."""
    explicit = os.environ.get("PAGEDSERVE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pagedserve"


def _gguf_key(path: str) -> str:
    import transformers

    st = os.stat(path)
    ident = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{transformers.__version__}"
    return hashlib.sha256(ident.encode()).hexdigest()[:32]
