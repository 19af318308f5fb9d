"""Batched detokenization against one decode call at a time, with SmolLM2's real tokenizer:
random ids, so special tokens and byte pieces that end mid-character come up."""

import random
from pathlib import Path

import pytest

from scheduler.frontend.tokenizer import IncrementalDetokenizer, Tokenizer, add_batch


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer(smollm2_path)


class OneCallEach:
    """The tokenizer with decode_batch as one decode() call per sequence."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip)

    def decode_batch(self, sequences: list[list[int]], skip: bool = True) -> list[str]:
        return [self.tokenizer.decode(ids, skip) for ids in sequences]


def random_sequences(vocab: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(length))] for _ in range(num)]


def test_the_batched_call_is_in_use_and_decodes_as_decode_does(tokenizer):
    assert tokenizer._backend is not None  # else decode_batch is decode() in a loop
    sequences = random_sequences(tokenizer.vocab_size, 64, 12)
    for skip in (True, False):
        expected = [tokenizer.decode(ids, skip) for ids in sequences]
        assert tokenizer.decode_batch(sequences, skip) == expected


def test_a_batched_step_streams_what_one_detokenizer_at_a_time_streams(tokenizer):
    sequences = random_sequences(tokenizer.vocab_size, 16, 40, seed=1)
    # Byte pieces of one multi-byte character, then text: text is held back until complete.
    sequences.append(tokenizer.encode("naïve café ☕ 日本語") * 2)
    skips = [i % 2 == 0 for i in range(len(sequences))]
    alone = [IncrementalDetokenizer(OneCallEach(tokenizer), skip) for skip in skips]
    batched = [IncrementalDetokenizer(tokenizer, skip) for skip in skips]
    for step in range(max(map(len, sequences))):
        rows = [i for i, ids in enumerate(sequences) if step < len(ids)]
        texts = add_batch([batched[i] for i in rows], [[sequences[i][step]] for i in rows])
        assert texts == [alone[i].add([sequences[i][step]]) for i in rows]
    for a, b, ids, skip in zip(alone, batched, sequences, skips, strict=True):
        assert a.flush() == b.flush()
        assert a.text == b.text == tokenizer.decode(ids, skip)


def test_messages_a_chat_template_refuses_are_a_value_error_naming_messages(smollm2_path):
    tokenizer = Tokenizer(smollm2_path)
    tokenizer._tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('a user speaks first') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="messages: the model's chat template refused them: a us"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}])


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
    assert cached._backend is not None
    sequences = random_sequences(converted.vocab_size, 32, 12, seed=3)
    for skip in (True, False):
        assert cached.decode_batch(sequences, skip) == converted.decode_batch(sequences, skip)
