"""Which engine core likely caches a prompt's prefix, as one frontend sees it: the chained hashes
of the full CHUNK-token chunks of the prompts it sent each core, the newest MAX_CHUNKS per core.

    prompt  [t0 .. t15][t16 .. t31][t32 .. t40]      (the last, partial chunk is not hashed)
    hashes   h1 = H(0, c1), h2 = H(h1, c2)            (each names its whole prefix)
    core i   remembers h1, h2, ... of what it was sent; matched(i) = leading hashes it holds

An approximation of the cores' prefix caches, as routers in front of several engines keep one
(SGLang's): a core's cache also holds other frontends' prompts, and evicts by its own measure.
It only steers requests that share a prefix to one core; each core's own router and prefix
cache do the exact work.
"""

from collections import OrderedDict
from collections.abc import Sequence

CHUNK = 16  # tokens a hash covers
MAX_CHUNKS = 1 << 16  # hashes remembered per core (the oldest forgotten first)


class PrefixIndex:
    def __init__(self, num_cores: int, max_chunks: int = MAX_CHUNKS) -> None:
        self._max_chunks = max_chunks
        # Per core: chained hash -> None, least recently sent first.
        self._sent: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_cores)]

    @staticmethod
    def hashes(prompt: Sequence[int]) -> list[int]:
        """The chained hash of each full chunk's prefix, in order."""
        out, chained = [], 0
        for start in range(0, len(prompt) - CHUNK + 1, CHUNK):
            chained = hash((chained, tuple(prompt[start : start + CHUNK])))
            out.append(chained)
        return out

    def matched(self, core: int, hashes: Sequence[int]) -> int:
        """Leading chunks of the prompt (its hashes) that core was sent before."""
        sent = self._sent[core]
        count = 0
        for chained in hashes:
            if chained not in sent:
                break
            count += 1
        return count

    def record(self, core: int, hashes: Sequence[int]) -> None:
        """The prompt (its hashes) goes to core: remembered there as the newest."""
        sent = self._sent[core]
        for chained in hashes:
            sent[chained] = None
            sent.move_to_end(chained)
        while len(sent) > self._max_chunks:
            sent.popitem(last=False)
