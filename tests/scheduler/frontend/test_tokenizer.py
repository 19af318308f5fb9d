"""Incremental detokenization with SmolLM2's real tokenizer, its DecodeStream against decode()
of windows: random ids, so special tokens and byte pieces that end mid-character come up."""

import random
from pathlib import Path

import pytest

from scheduler.frontend.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer(smollm2_path)


class Windowed:
    """The tokenizer without its DecodeStream: text streams from decode() of windows."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip)

    def decode_stream(self, skip_special_tokens: bool) -> None:
        return None


def random_sequences(vocab: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(length))] for _ in range(num)]


@pytest.mark.parametrize("tokens_a_step", [1, 3])
def test_the_stream_and_the_windows_stream_the_same_text_a_prefix_of_decode(
    tokenizer, tokens_a_step
):
    assert tokenizer.decode_stream(True) is not None  # SmolLM2's is the library's own
    sequences = random_sequences(tokenizer.vocab_size, 64, 40, seed=1)
    # Byte pieces of one multi-byte character, then text: text is held back until complete.
    sequences.append(tokenizer.encode("naïve café ☕ 日本語") * 2)
    for i, ids in enumerate(sequences):
        skip = i % 2 == 0
        final = tokenizer.decode(ids, skip)
        streamed = IncrementalDetokenizer(tokenizer, skip)
        windowed = IncrementalDetokenizer(Windowed(tokenizer), skip)
        for start in range(0, len(ids), tokens_a_step):
            step = ids[start : start + tokens_a_step]
            assert streamed.add(step) == windowed.add(step)
            assert final.startswith(streamed.text)
        assert streamed.flush() == windowed.flush()
        assert streamed.text == windowed.text == final


def test_decode_through_the_library_is_transformers_decode(tokenizer):
    """decode() calls the tokenizers library directly: the text transformers' decode gives."""
    sequences = random_sequences(tokenizer.vocab_size, 64, 40, seed=2)
    sequences.append(tokenizer.encode("naïve café ☕ 日本語  two  spaces, 'quotes' n't"))
    for i, ids in enumerate(sequences):
        skip = i % 2 == 0
        assert tokenizer.decode(ids, skip) == tokenizer._tok.decode(ids, skip_special_tokens=skip)


def test_messages_a_chat_template_refuses_are_a_value_error_naming_messages(smollm2_path):
    tokenizer = Tokenizer(smollm2_path)
    tokenizer._tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('a user speaks first') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="messages: the model's chat template refused them: a us"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}])


def test_a_message_of_a_role_no_api_knows_is_a_value_error_naming_it(smollm2_path):
    """Over gRPC as over HTTP: a role outside CHAT_ROLES is refused, not rendered (SmolLM2's
    template would render any role)."""
    tokenizer = Tokenizer(smollm2_path)
    chat = [{"role": "user", "content": "hi"}, {"role": "usr", "content": "and?"}]
    with pytest.raises(ValueError, match=r"messages\[1\]\.role must be one of system, developer"):
        tokenizer.apply_chat_template(chat)
    assert tokenizer.apply_chat_template(chat[:1])


def test_a_gguf_tokenizer_loads_from_its_cache_as_from_the_file(
    smollm2_path, tmp_path, monkeypatch
):
    from transformers import AutoTokenizer

    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    loads = []
    load = AutoTokenizer.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        loads.append((str(args[0]), kwargs.get("gguf_file")))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(recording))
    converted = Tokenizer(smollm2_path)
    (entry,) = (tmp_path / "tokenizers").iterdir()
    cached = Tokenizer(smollm2_path)
    assert loads == [(str(Path(smollm2_path).parent), Path(smollm2_path).name), (str(entry), None)]

    texts = ["Hello, world!", "  héllo 日本語 🙂\n\ttabs", "<|im_start|>user\nHi<|im_end|>", ""]
    assert [cached.encode(t) for t in texts] == [converted.encode(t) for t in texts]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert cached.apply_chat_template(messages) == converted.apply_chat_template(messages)
    assert (cached.eos_token_ids, cached.vocab_size) == (
        converted.eos_token_ids,
        converted.vocab_size,
    )
    assert cached.decode_stream(True) is not None
    sequences = random_sequences(converted.vocab_size, 32, 12, seed=3)
    for skip in (True, False):
        for ids in sequences:
            assert cached.decode(ids, skip) == converted.decode(ids, skip)
            ours, theirs = cached.decode_stream(skip), converted.decode_stream(skip)
            assert [ours([t]) for t in ids] == [theirs([t]) for t in ids]
