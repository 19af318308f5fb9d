"""The frontend's approximate prefix index: chained hashes of full chunks, matched from the
start, per core, the oldest forgotten first."""

from scheduler.frontend.prefix_index import CHUNK, PrefixIndex


def test_only_full_chunks_are_hashed_and_each_hash_names_its_whole_prefix():
    prompt = list(range(2 * CHUNK + 5))
    hashes = PrefixIndex.hashes(prompt)
    assert len(hashes) == 2
    assert PrefixIndex.hashes(prompt[: 2 * CHUNK]) == hashes
    other_start = [99, *prompt[1:]]  # the same second chunk after another first one
    assert PrefixIndex.hashes(other_start)[1] != hashes[1]
    assert PrefixIndex.hashes(prompt[: CHUNK - 1]) == []


def test_a_prompt_matches_the_leading_chunks_a_core_was_sent():
    index = PrefixIndex(2)
    system = list(range(3 * CHUNK))
    index.record(0, PrefixIndex.hashes(system + [7] * CHUNK))
    asked = PrefixIndex.hashes(system + [8] * CHUNK)  # the same 3 chunks, another 4th
    assert (index.matched(0, asked), index.matched(1, asked)) == (3, 0)
    shifted = PrefixIndex.hashes([1] + system)  # nothing in common from the start
    assert index.matched(0, shifted) == 0


def test_the_oldest_chunks_are_forgotten_beyond_the_bound():
    index = PrefixIndex(1, max_chunks=4)
    first = PrefixIndex.hashes([1] * (2 * CHUNK))
    second = PrefixIndex.hashes([2] * (2 * CHUNK))
    third = PrefixIndex.hashes([3] * (2 * CHUNK))
    index.record(0, first)
    index.record(0, second)
    index.record(0, first)  # sent again: the newest now
    index.record(0, third)
    assert [index.matched(0, h) for h in (first, second, third)] == [2, 0, 2]
