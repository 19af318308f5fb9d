"""Replicas on a simulated multi-node Ray (ray.cluster_utils.Cluster, fake GPUs, gloo): a TP=2
replica starts from configs/tp2.yaml with both ranks on one node; two replicas serve 64
concurrent streaming requests with the same greedy tokens as one replica, and both serve."""

import pytest
import ray

from cluster.client import Client
from cluster.config import load_config
from cluster.launcher import Cluster
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO


@pytest.fixture(scope="module")
def two_nodes():
    from ray.cluster_utils import Cluster as RayCluster

    assert not ray.is_initialized(), "this module needs its own Ray"
    nodes = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        nodes.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=nodes.address, namespace="pagedserve-test")
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _start(config_name, tiny_dir, smollm2_path, *overrides):
    config = load_config(
        f"{REPO}/configs/{config_name}",
        [
            f"model.model={tiny_dir}",
            f"model.tokenizer={smollm2_path}",
            "model.max_model_len=256",
            "cache.num_blocks=256",
            "cache.block_size=8",
            "server.port=0",
            *overrides,
        ],
    )
    cluster = Cluster(config)
    cluster.start()
    return cluster


def _node_of(cluster, rank_actor):
    return ray.get(rank_actor.node_id.remote(), timeout=60)


def _generate_all(address, prompts, max_tokens=6):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with Client(address) as client:
        streams = [client.generate(p, params, timeout=300) for p in prompts]
        return [[t for d in s for t in d.token_ids] for s in streams]


PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(4 + i % 9)] for i in range(64)]


def test_tp2_replica_starts_from_yaml_on_one_node(two_nodes, tiny_models, smollm2_path):
    path, _ = tiny_models["llama_uneven"]
    cluster = _start("tp2.yaml", path, smollm2_path)
    try:
        assert len(cluster.workers) == 2
        nodes = {_node_of(cluster, w) for w in cluster.workers}
        assert len(nodes) == 1, "STRICT_PACK keeps a replica's ranks on one node"
        assert _generate_all(cluster.address, PROMPTS[:4])
    finally:
        cluster.shutdown()


def test_two_replicas_match_one(two_nodes, tiny_models, smollm2_path):
    path, _ = tiny_models["llama"]
    one = _start("replicas.yaml", path, smollm2_path, "parallel.replicas=1")
    try:
        expected = _generate_all(one.address, PROMPTS)
    finally:
        one.shutdown()
    two = _start("replicas.yaml", path, smollm2_path)
    try:
        got = _generate_all(two.address, PROMPTS)
        with Client(two.address) as client:
            replicas = client.server_info().replicas
    finally:
        two.shutdown()
    assert got == expected
    assert len(replicas) == 2
    assert all(r.num_prompt_tokens_computed > 0 for r in replicas), "a replica served nothing"
