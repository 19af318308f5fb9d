"""Recovery on a local 2-replica CPU cluster (a tiny random Llama, greedy), both replicas in one
engine core and each in an engine core of its own (parallel.engine_cores 1 and 2: with two, the
failed replica's requests wait in its core for its restart while the frontend routes new ones to
the other core): `kill -9` of one replica's worker while 16 streams of 128 tokens run. Every
stream finishes with exactly its fault-free tokens, the replica serves again (new worker) within
60 s, and every pool's used blocks return to their baseline. `pagedserve chaos`
(cluster/chaos.py) injects the fault.

Then `kill -STOP` of a worker (alive, silent) under a few streams, through `pagedserve chaos
--hang`: the step watchdog (a short scheduler.step_timeout_s here) fails its replica, which is
recovered as a dead one, and `pagedserve status` names the rank and the seconds."""

import os
import re

import pytest

from cluster import chaos, cli
from cluster.client import Client
from cluster.config import load_config
from cluster.launcher import Cluster
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO

NUM_STREAMS = 16
MAX_TOKENS = 128
RECOVERY_S = 60.0
TIMEOUT = 300.0
# Short for the hang test, far above any step of the tiny model (milliseconds), and below the
# worker channels' keepalive (5 s + 5 s), so the watchdog is what finds the stopped worker.
STEP_TIMEOUT_S = 3


@pytest.fixture(scope="module", params=[1, 2], ids=["one_engine_core", "two_engine_cores"])
def cluster(request, tiny_models, smollm2_path):
    path, _ = tiny_models["llama"]
    config = load_config(
        os.path.join(REPO, "configs", "replicas.yaml"),
        [
            f"model.model={path}",
            f"model.tokenizer={smollm2_path}",
            "model.device=cpu",
            "model.max_model_len=256",
            "cache.num_blocks=128",
            "cache.block_size=8",
            "server.port=0",
            "server.http_port=0",
            "server.frontends=1",
            "cluster.num_cpus=2",
            f"scheduler.step_timeout_s={STEP_TIMEOUT_S}",
            f"parallel.engine_cores={request.param}",
        ],
    )
    cluster = Cluster(config)
    cluster.start()
    yield cluster
    cluster.shutdown()


def test_a_killed_worker_loses_no_token_and_its_replica_comes_back(cluster):
    prompts = chaos.prompts_for(256, NUM_STREAMS, 12, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with Client(cluster.address) as client:
        calls = [client.generate(p, params, timeout=TIMEOUT) for p in prompts]
        expected = [[t for delta in call for t in delta.token_ids] for call in calls]
        assert all(len(tokens) == MAX_TOKENS for tokens in expected)
        # Once the streams are a tenth of the way: replica 1's worker dies mid-stream.
        kill = chaos.Fault("worker", 1, after_tokens=NUM_STREAMS * MAX_TOKENS // 10)
        report = chaos.run(client, prompts, MAX_TOKENS, [kill], reference=expected)
        info = client.server_info()
    assert report.num_recovered_requests > 0, "the killed worker's replica held no stream"
    assert report.lost == [] and report.finished == NUM_STREAMS
    assert [report.outputs[f"chaos-{i}"].tokens for i in range(NUM_STREAMS)] == expected
    assert report.token_exact  # CPU workers: the tokens themselves are compared
    assert report.mismatched == [] and report.duplicated_tokens == report.missing_tokens == 0
    assert report.recovery_s.get("kill worker 1", float("inf")) <= RECOVERY_S, report.recovery_s
    assert [r.state for r in info.replicas] == ["serving", "serving"]
    assert report.blocks_after == report.blocks_before


def test_a_hung_worker_is_failed_by_the_step_watchdog_and_handled_as_a_dead_one(cluster, capsys):
    address = ["--address", cluster.address]
    hang = ["--num-requests", "4", "--prompt-len", "12", "--max-tokens", str(MAX_TOKENS)]
    hang += ["--hang", "worker:1@40t", "--timeout", str(TIMEOUT)]
    code = cli.main(["chaos", *address, *hang])
    report = capsys.readouterr().out
    # 0: nothing lost, every stream equal to the fault-free run, blocks back, the replica
    # serves again, the stopped process killed by the server (else the tool kills it: the
    # run leaves nothing stopped behind either way).
    assert code == 0, report
    assert "requests: 4, finished 4, cancelled 0, lost 0" in report
    assert int(re.search(r"requests moved off failed replicas: (\d+)", report)[1]) > 0, report
    recovered = float(re.search(r"recovered hang worker 1 in ([\d.]+) s", report)[1])
    assert recovered <= RECOVERY_S
    assert cli.main(["status", *address]) == 0
    status = capsys.readouterr().out
    assert re.search(
        r"replica 1 \(serving\).*\n  last failure: step \d+ hangs: worker rank 0 \(\S+\) sent "
        rf"no result in \d+\.\d s \(scheduler\.step_timeout_s={STEP_TIMEOUT_S}\)\n",
        status,
    ), status
