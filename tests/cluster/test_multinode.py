"""Replicas on a simulated multi-node Ray (ray.cluster_utils.Cluster, fake GPUs, gloo): a TP=2
replica starts from configs/tp2.yaml with both ranks on one node; two replicas serve 64
concurrent streaming requests with the same greedy tokens as one replica, and both serve."""

import ray

from cluster.client import Client
from tests.cluster.conftest import PROMPTS, generate_all, start_cluster


def test_tp2_replica_starts_from_yaml_on_one_node(two_nodes, tiny_models, smollm2_path):
    path, _ = tiny_models["llama_uneven"]
    cluster = start_cluster("tp2.yaml", path, smollm2_path)
    try:
        workers = cluster.workers()
        assert len(workers) == 2
        nodes = set(ray.get([w.node_id.remote() for w in workers], timeout=60))
        assert len(nodes) == 1, "STRICT_PACK keeps a replica's ranks on one node"
        assert generate_all(cluster.address, PROMPTS[:4])
    finally:
        cluster.shutdown()


def test_two_replicas_match_one(two_nodes, tiny_models, smollm2_path):
    path, _ = tiny_models["llama"]
    one = start_cluster("replicas.yaml", path, smollm2_path, "parallel.replicas=1")
    try:
        expected = generate_all(one.address, PROMPTS)
    finally:
        one.shutdown()
    two = start_cluster("replicas.yaml", path, smollm2_path)
    try:
        got = generate_all(two.address, PROMPTS)
        with Client(two.address) as client:
            replicas = client.server_info().replicas
    finally:
        two.shutdown()
    assert got == expected
    assert len(replicas) == 2
    assert all(r.num_prompt_tokens_computed > 0 for r in replicas), "a replica served nothing"
