"""`pagedserve up | generate | status | down` as a user runs them: separate processes, a real
embedded Ray. After `down` or Ctrl-C, none of the processes `up` started is left."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def up(tmp_path):
    env = {**os.environ, "PAGEDSERVE_STATE_DIR": str(tmp_path), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "up",
            "-c",
            "configs/local.yaml",
            "--set",
            "server.port=0",
            "--set",
            "server.http_port=0",
            "--set",
            "cluster.num_cpus=2",
            "--set",
            "cache.cpu_cache_gb=0.5",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state = tmp_path / "cluster.json"
    deadline = time.monotonic() + 300
    while not state.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "pagedserve up did not come up in 300 s"
        time.sleep(0.5)
    yield proc, env, json.loads(state.read_text())
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _assert_all_gone(pids: set[int]) -> None:
    deadline = time.monotonic() + 30
    while (left := {p for p in pids if _alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"


def test_up_generate_status_down(up):
    proc, env, state = up
    assert state["pid"] == proc.pid
    started = _descendants(proc.pid)
    assert len(started) >= 3  # Ray's own processes plus the scheduler and worker actors
    gen = _cli("generate", "What is the capital of France?", "--max-tokens", "32", env=env)
    assert gen.returncode == 0, gen.stderr
    assert "Paris" in gen.stdout and "finish_reason=stop" in gen.stdout
    status = _cli("status", env=env)
    assert status.returncode == 0, status.stderr
    assert "replica 0" in status.stdout and "rank 0" in status.stdout
    pattern = r": (\d+) steps \(0% in whole CUDA graphs, 0% in pieces, ([\d.]+) ms each\)"
    steps = re.search(pattern, status.stdout)
    assert steps and int(steps[1]) >= 2 and float(steps[2]) > 0, status.stdout  # a CPU: no graphs
    frontends = re.findall(
        r"frontend pid \d+: (\d+) requests since it connected, (\d+) unf", status.stdout
    )
    assert frontends and sum(int(n) for n, _ in frontends) == 1  # the generate above
    assert all(unfinished == "0" for _, unfinished in frontends)
    down = _cli("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert proc.wait(timeout=60) == 0
    _assert_all_gone(started | {proc.pid})
    assert not (Path(env["PAGEDSERVE_STATE_DIR"]) / "cluster.json").exists()


def test_ctrl_c_on_up_leaves_nothing_behind(up):
    proc, env, _ = up
    started = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
    _assert_all_gone(started | {proc.pid})
