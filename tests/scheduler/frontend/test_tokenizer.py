"""Batched detokenization against one decode call at a time, with SmolLM2's real tokenizer:
random ids, so special tokens and byte pieces that end mid-character come up."""

import random

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
