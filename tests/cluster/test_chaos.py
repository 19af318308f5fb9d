"""`pagedserve chaos`'s parts that need no server: the --kill and --hang syntax, and how
streams are judged against the fault-free run (a cancelled one must be a prefix of it; a token
sent twice or never sent is counted). tests/e2e/test_recovery.py runs it against a cluster."""

import pytest

from cluster.chaos import Fault, Stream, _report


def test_kill_specs_parse_and_bad_ones_say_what_is_expected():
    assert Fault.parse("worker:1@300t") == Fault("worker", 1, after_tokens=300)
    assert Fault.parse("frontend@2.5s") == Fault("frontend", 0, at_s=2.5)
    for bad in ("worker", "gpu:1@2s", "replica:x@2s", "replica:1@2m", "worker@s", "worker:-1@2s"):
        with pytest.raises(ValueError, match="--kill"):
            Fault.parse(bad)
    assert Fault.parse("replica:1@2s", hang=True) == Fault("replica", 1, at_s=2.0, hang=True)
    with pytest.raises(ValueError, match="--hang 'frontend@2s': .* KIND one of"):
        Fault.parse("frontend@2s", hang=True)  # the core does not watch its frontends hang


def test_streams_are_judged_against_the_reference():
    reference = [[1, 2, 3, 4]] * 5
    streams = [
        Stream([1, 2, 3, 4], "length"),
        Stream([1, 2], cancelled=True),  # a prefix: fine
        Stream([1, 2, 2, 3, 4], "length"),  # a token sent twice
        Stream([1, 3, 4], "length"),  # a token never sent
        Stream([1], error="UNAVAILABLE: gone"),
    ]
    report = _report(streams, reference, {0: 0}, {0: 0}, {})
    assert (report.finished, report.cancelled) == (3, 1)
    assert report.lost == ["chaos-4: UNAVAILABLE: gone"]
    assert [line.split(":")[0] for line in report.mismatched] == ["chaos-2", "chaos-3"]
    assert (report.duplicated_tokens, report.missing_tokens) == (1, 1)
    assert "first difference at token 2" in report.mismatched[0]
