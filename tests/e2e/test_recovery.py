"""Recovery on a local 2-replica CPU cluster (a tiny random Llama, greedy): `kill -9` of one
replica's worker while 16 streams of 128 tokens run. Every stream finishes with exactly its
fault-free tokens, the replica serves again (new worker) within 60 s, and every pool's used
blocks return to their baseline. `pagedserve chaos` (cluster/chaos.py) injects the fault."""

import os

import pytest

from cluster import chaos
from cluster.client import Client
from cluster.config import load_config
from cluster.launcher import Cluster
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO

NUM_STREAMS = 16
MAX_TOKENS = 128
RECOVERY_S = 60.0
TIMEOUT = 300.0


@pytest.fixture(scope="module")
def cluster(tiny_models, smollm2_path):
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
    assert report.mismatched == [] and report.duplicated_tokens == report.missing_tokens == 0
    assert report.recovery_s.get("worker 1", float("inf")) <= RECOVERY_S, report.recovery_s
    assert [r.state for r in info.replicas] == ["serving", "serving"]
    assert report.blocks_after == report.blocks_before
