"""cluster.benchmarks.host_step on the CPU: with a new prompt beside the batch every step
(--prompt-len) it runs every plan through a runner sized for them; a row's host column (the
median of each step's parts summed) is at least the median of each part; the sampler's time
is its own column, none where every row is greedy."""

import pytest

from cluster.benchmarks import host_step


@pytest.mark.parametrize("prompt_len, sampling", [(0, "greedy"), (24, "greedy"), (0, "top-p")])
def test_host_step_reports_a_row_per_batch(capsys, prompt_len, sampling):
    host_step.main(
        ["--batch-size", "2", "5", "--context-len", "9", "--steps", "12"]
        + ["--prompt-len", str(prompt_len), "--sampling", sampling]
    )
    lines = capsys.readouterr().out.splitlines()
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ")][1:]
    assert [int(row[0]) for row in rows] == [2, 5]
    for row in rows:
        parse, launch, device, sample, finish, result, host = (float(cell) for cell in row[1:])
        assert launch > 0 and device > 0
        assert (sample > 0) == (sampling != "greedy")
        assert host >= max(parse, launch, finish, result)
