"""The streamed text of one completion: incremental detokenization plus stop strings.

    text:    "The answer is 42.\\n\\nQ"        stop = ["\\n\\nQ:"]  (4 characters)
    sent:    |<-------- streamed ------->|
    held:                                 |<-3->|  may be the start of a stop string

A stop string may span token boundaries, so it is looked for in the text, in the window that the
newest characters could complete. While stop strings are excluded from the output, the last
len(longest stop) - 1 characters are held back from the stream, so text that a later match cuts
off is never sent. Invariant: sent <= len(text) - held, and a match never starts before `sent`.
A FINAL_ONLY completion without stop strings needs no text before its end: its tokens wait and
are detokenized once, by finish().
"""

from scheduler.frontend.tokenizer import IncrementalDetokenizer, Tokenizer
from scheduler.sampling_params import RequestOutputKind, SamplingParams


class CompletionText:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stop = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._hold = max(map(len, self._stop)) - 1 if self._stop and not self._include_stop else 0
        self.text = ""  # the text of the tokens detokenized so far, cut at a matched stop string
        self.stop_str: str | None = None  # the stop string that ended it
        self._sent = 0  # characters of text already streamed
        self._num_tokens = 0
        # Tokens not detokenized yet: only while nothing reads the text before the end.
        self._defer = not self._stop and params.output_kind is RequestOutputKind.FINAL_ONLY
        self._waiting: list[int] = []

    def add(self, token_ids: list[int]) -> str | None:
        """Appends tokens; returns the stop string they completed, if any (the text is then cut
        before it, or after it with include_stop_str_in_output)."""
        self._num_tokens += len(token_ids)
        if self._defer:
            self._waiting.extend(token_ids)
            return None
        return self._append(self._detok.add(token_ids))

    def finish(self) -> None:
        """The completion ended: release the text the detokenizer still holds back."""
        self._catch_up()
        if self.stop_str is None:
            self._append(self._detok.flush())

    def take(self, finished: bool) -> str:
        """The text not streamed yet; while unfinished, short of what a stop string may claim."""
        self._catch_up()
        end = len(self.text) if finished else max(self._sent, len(self.text) - self._hold)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta

    def _catch_up(self) -> None:
        if self._waiting:
            self._append(self._detok.add(self._waiting))
            self._waiting = []

    def _append(self, new: str) -> str | None:
        if self.stop_str is not None:  # already stopped: later tokens add no text
            return None
        self.text += new
        if not new or not self._stop or self._num_tokens <= self._min_tokens:
            return None
        # A match must end inside the new characters: start the search that far back.
        found = None
        for stop in self._stop:
            index = self.text.find(stop, max(0, len(self.text) - len(new) - len(stop) + 1))
            if index >= 0 and (found is None or index < found[0]):
                found = (index, stop)
        if found is None:
            return None
        index, stop = found
        self.text = self.text[: index + len(stop) if self._include_stop else index]
        self.stop_str = stop
        return stop

