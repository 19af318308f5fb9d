"""A CPU worker's torch threads: the node's cores shared by its replica's ranks there, unless
OMP_NUM_THREADS was set when the process started."""

import os
import subprocess
import sys

from worker.threads import available_cores, cpu_threads

_PROBE = """
import os, torch
os.environ["OMP_NUM_THREADS"] = "1"  # as Ray sets it in a worker process that had none
from worker.threads import configure_cpu_threads
print(configure_cpu_threads({ranks}), torch.get_num_threads())
"""


def _probe(ranks: int, omp: str | None) -> list[int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp is not None:
        env["OMP_NUM_THREADS"] = omp
    out = subprocess.run(
        [sys.executable, "-c", _PROBE.format(ranks=ranks)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [int(x) for x in out.split()]


def test_cores_are_shared_by_the_ranks_on_a_node():
    assert cpu_threads(2, 1) == 2
    assert cpu_threads(2, 2) == 1
    assert cpu_threads(16, 3) == 5
    assert cpu_threads(2, 4) == 1  # at least one


def test_a_worker_takes_its_share_unless_omp_num_threads_was_set_at_start():
    cores = available_cores()
    assert _probe(1, None) == [cores, cores]  # what Ray set after the start does not count
    assert _probe(2, None) == [max(cores // 2, 1)] * 2
    assert _probe(1, "1") == [1, 1]  # the user's
