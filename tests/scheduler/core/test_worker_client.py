"""The core's channel to a worker pings it (protos/keepalive.py): a rank whose process is
stopped (kill -STOP), alive but silent, ends its Execute stream UNAVAILABLE within the
keepalive's time and timeout, while a live idle rank keeps its stream however long it idles.
The rank is a fake one on a gRPC server in a process of its own, so that it can be stopped."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from protos import worker_pb2
from protos.keepalive import Keepalive
from scheduler.core.worker_client import WorkerClient
from tests.conftest import REPO
from tests.scheduler.fake_worker import TIMEOUT

KEEPALIVE = Keepalive(time_s=0.3, timeout_s=0.3)
_RANK = """
import sys
from tests.scheduler.fake_worker import FakeRank, serving
with serving(FakeRank()) as address:
    print(address, flush=True)
    sys.stdin.read()  # serves until the test closes its stdin
"""


@pytest.fixture
def rank_process():
    process = subprocess.Popen(
        [sys.executable, "-c", _RANK],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        process.kill()  # SIGKILL ends a stopped process too
        process.wait(TIMEOUT)


def test_a_stopped_rank_ends_its_execute_stream_unavailable_and_an_idle_live_one_does_not(
    rank_process,
):
    address = rank_process.stdout.readline().strip()
    client = WorkerClient(address, keepalive=KEEPALIVE)
    try:
        stream = client.execute()
        ended, why = threading.Event(), []
        stream.on_end(lambda _, reason: (why.append(reason), ended.set()))
        stream.send(worker_pb2.StepPlan(step_id=1))
        assert stream.recv().step_id == 1
        # Idle for several pings: a live rank answers them all (no GOAWAY for too many pings).
        assert not ended.wait(10 * KEEPALIVE.time_s), why
        os.kill(rank_process.pid, signal.SIGSTOP)
        assert ended.wait(TIMEOUT), "a stopped rank's stream stayed open"
        assert why[0].startswith("UNAVAILABLE"), why
    finally:
        client.close()
