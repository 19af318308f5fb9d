"""Fixtures of the cluster tests: a simulated multi-node Ray per module
(ray.cluster_utils.Cluster, fake GPUs, gloo) and pagedserve clusters of the tiny random models."""

import pytest
import ray

from cluster.client import Client
from cluster.config import load_config
from cluster.launcher import Cluster
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO

# Token-id prompts of 4 to 12 tokens (the tiny models' vocabulary is 256).
PROMPTS = [[(7 * i + j) % 250 + 3 for j in range(4 + i % 9)] for i in range(64)]


@pytest.fixture(scope="module")
def two_nodes():
    """A head without GPUs and two nodes of two (fake) GPUs each; this module's Ray."""
    from ray.cluster_utils import Cluster as RayCluster

    assert not ray.is_initialized(), "this module needs its own Ray"
    nodes = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        nodes.add_node(num_cpus=1, num_gpus=2)
    ray.init(address=nodes.address, namespace="pagedserve-test")
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def start_cluster(config_name: str, tiny_dir, smollm2_path: str, *overrides: str) -> Cluster:
    """configs/<config_name> serving a tiny model (SmolLM2's tokenizer) on the Ray this process
    is connected to."""
    config = load_config(
        f"{REPO}/configs/{config_name}",
        [
            f"model.model={tiny_dir}",
            f"model.tokenizer={smollm2_path}",
            "model.max_model_len=256",
            "cache.num_blocks=256",
            "cache.block_size=8",
            "server.port=0",
            "server.http_port=0",
            *overrides,
        ],
    )
    cluster = Cluster(config)
    cluster.start()
    return cluster


def generate_all(address: str, prompts, max_tokens: int = 6) -> list[list[int]]:
    """Greedy tokens of every prompt, all submitted at once."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    with Client(address) as client:
        streams = [client.generate(p, params, timeout=300) for p in prompts]
        return [[t for d in s for t in d.token_ids] for s in streams]
