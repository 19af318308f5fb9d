"""Stop strings over streamed text, with a tokenizer whose tokens are fixed pieces of text."""

import pytest

from scheduler.frontend.completion_text import CompletionText
from scheduler.sampling_params import SamplingParams

PIECES = ["The", " answer", " is", " 4", "2", ".\n", "\nQ", ":", " next", " one"]


class PieceTokenizer:
    """Token i is PIECES[i]; decoding concatenates the pieces."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in token_ids)

    def decode_stream(self, skip_special_tokens: bool) -> None:
        return None  # streamed text comes from decode() of windows


def stream(params: SamplingParams, num_tokens: int = len(PIECES)) -> tuple[list[str], str | None]:
    """The deltas streamed token by token (the last one once finished), and the stop string."""
    text = CompletionText(PieceTokenizer(), params)
    deltas = []
    for token in range(num_tokens):
        stop = text.add([token])
        if stop is not None or token == num_tokens - 1:
            text.finish()
            deltas.append(text.take(True))
            return deltas, stop
        deltas.append(text.take(False))
    raise AssertionError("unreachable")


def test_a_stop_string_across_tokens_ends_the_text_before_it():
    deltas, stop = stream(SamplingParams(stop=["\n\nQ:"]))
    assert stop == "\n\nQ:"
    assert "".join(deltas) == "The answer is 42."
    # Nothing streamed was later cut: every prefix streamed is a prefix of the final text.
    assert all("".join(deltas[: i + 1]) in "The answer is 42." for i in range(len(deltas)))


def test_include_stop_str_in_output_keeps_it_and_holds_nothing_back():
    deltas, stop = stream(SamplingParams(stop=["42"], include_stop_str_in_output=True))
    assert stop == "42"
    assert deltas == ["The", " answer", " is", " 4", "2"]


def test_held_back_text_streams_once_no_stop_string_can_claim_it():
    deltas, stop = stream(SamplingParams(stop=["zzzz"]), num_tokens=4)
    assert stop is None
    # Three characters (len("zzzz") - 1) are held back until the end.
    assert deltas == ["", "The ans", "wer", " is 4"]


def test_the_earliest_match_wins_whatever_the_order_of_the_list():
    deltas, stop = stream(SamplingParams(stop=["next", "Q"]))
    assert stop == "Q"
    assert "".join(deltas) == "The answer is 42.\n\n"


def test_stop_strings_wait_for_min_tokens():
    # " is" completes at the 3rd token; with min_tokens=3 the check starts at the 4th.
    deltas, stop = stream(SamplingParams(stop=[" is", "Q"], min_tokens=3))
    assert stop == "Q"


@pytest.mark.parametrize("bad", [[""], ["ok", ""]])
def test_an_empty_stop_string_is_refused(bad):
    with pytest.raises(ValueError, match="stop must not contain an empty string"):
        SamplingParams(stop=bad)
