"""Replicas on a simulated multi-node Ray (ray.cluster_utils.Cluster, fake GPUs, gloo): the two
TP=2 replicas of configs/multinode.yaml, one per GPU node, answer 64 concurrent streams with the
greedy tokens of configs/tp2.yaml's one replica, and both serve; their workers listen on their
node's address and refuse any caller without the cluster secret. A context beyond the model's
fails before anything starts."""

import grpc
import pytest
import ray

from cluster.client import Client
from cluster.config import ConfigError, load_config
from cluster.launcher import Cluster
from protos import worker_pb2, worker_pb2_grpc
from protos.cluster_secret import METADATA_KEY
from tests.cluster.conftest import PROMPTS, generate_all, start_cluster
from tests.conftest import REPO


@pytest.fixture(scope="module")
def tp2_tokens(two_nodes, tiny_models, smollm2_path) -> list[list[int]]:
    """Greedy tokens of PROMPTS from configs/tp2.yaml (one TP=2 replica), stopped after."""
    cluster = start_cluster("tp2.yaml", tiny_models["llama_uneven"][0], smollm2_path)
    try:
        return generate_all(cluster.address, PROMPTS)
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def multinode(two_nodes, tp2_tokens, tiny_models, smollm2_path):
    """configs/multinode.yaml serving: it takes every GPU, so it starts once tp2's stopped."""
    cluster = start_cluster("multinode.yaml", tiny_models["llama_uneven"][0], smollm2_path)
    yield cluster
    cluster.shutdown()


def test_two_tp2_replicas_match_one_each_on_a_node_of_its_own(multinode, tp2_tokens):
    assert generate_all(multinode.address, PROMPTS) == tp2_tokens
    with Client(multinode.address) as client:
        replicas = client.server_info().replicas
    assert [len(r.workers) for r in replicas] == [2, 2]
    nodes = [{w.node_id for w in r.workers} for r in replicas]
    assert all(len(n) == 1 for n in nodes), "STRICT_PACK keeps a replica's ranks on one node"
    assert nodes[0] != nodes[1], "each GPU node holds one replica"
    assert all(r.num_prompt_tokens_computed > 0 for r in replicas), "a replica served nothing"


def test_workers_off_the_core_node_serve_the_core_alone(multinode, tp2_tokens):
    """The core runs on the head, the workers on the GPU nodes: they listen on their node's
    address (not every interface) and answer only calls with the cluster secret; refused
    calls (Shutdown among them) leave the cluster serving."""
    with Client(multinode.address) as client:
        workers = [w for r in client.server_info().replicas for w in r.workers]
    node_ip = ray.util.get_node_ip_address()
    assert all(w.address.rpartition(":")[0] == node_ip for w in workers), workers
    for worker in workers:
        with grpc.insecure_channel(worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            for metadata in [(), ((METADATA_KEY, "guessed"),)]:
                with pytest.raises(grpc.RpcError) as err:
                    stub.Shutdown(worker_pb2.Empty(), metadata=metadata, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            secret = ((METADATA_KEY, multinode.secret),)
            assert stub.Health(worker_pb2.Empty(), metadata=secret, timeout=30).ready
    assert generate_all(multinode.address, PROMPTS[:4]) == tp2_tokens[:4]


def test_a_context_beyond_the_model_fails_before_anything_starts(
    two_nodes, tiny_models, smollm2_path
):
    """The tiny model's context is 256 tokens: asked for 512, the cluster is refused naming
    the file and the key, with no scheduler actor (nor any worker) started."""
    path = f"{REPO}/configs/multinode.yaml"
    overrides = [f"model.model={tiny_models['llama'][0]}", f"model.tokenizer={smollm2_path}"]
    cluster = Cluster(load_config(path, [*overrides, "model.max_model_len=512"]), path)
    with pytest.raises(ConfigError) as err:
        cluster.start()
    assert str(err.value) == (
        f"{path}: model.max_model_len=512 exceeds the model's context length of 256 tokens "
        "(its max_position_embeddings); lower it"
    )
    assert cluster.schedulers == []
