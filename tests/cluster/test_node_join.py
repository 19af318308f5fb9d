"""A real second Ray node: a separate `ray start --address=<head>` process joins the running
cluster, and `pagedserve scale` places the new replica on it (the head's one GPU is taken)."""

import os
import subprocess
import sys
import time

import pytest
import ray

from cluster.client import Client
from tests.cluster.conftest import PROMPTS, generate_all, start_cluster
from tests.conftest import REPO

JOINED_RESOURCE = "pagedserve_node2"


def _joined_node_id() -> str | None:
    for node in ray.nodes():
        if node["Alive"] and JOINED_RESOURCE in node["Resources"]:
            return node["NodeID"]
    return None


@pytest.fixture(scope="module")
def join_node():
    """A head of one (fake) GPU run by this process; yields join(), which starts a node of one
    more in a `ray start --block` process of its own and returns the node's id once it has
    joined. Terminating that process stops its node alone (`ray stop` would stop every Ray on
    the machine)."""
    from ray.cluster_utils import Cluster as RayCluster

    assert not ray.is_initialized(), "this module needs its own Ray"
    head = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 1})
    ray.init(address=head.address, namespace="pagedserve-test")
    started: list[subprocess.Popen] = []

    def join() -> str:
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        node = subprocess.Popen(
            [
                ray_cli,
                "start",
                f"--address={head.address}",
                "--num-cpus=1",
                "--num-gpus=1",
                f'--resources={{"{JOINED_RESOURCE}": 1}}',
                "--block",
            ],
            cwd=REPO,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": REPO},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        started.append(node)
        deadline = time.monotonic() + 120
        while (node_id := _joined_node_id()) is None:
            assert node.poll() is None, f"ray start exited with {node.returncode}"
            assert time.monotonic() < deadline, "the second node did not join within 120 s"
            time.sleep(0.5)
        return node_id

    try:
        yield join
    finally:
        for node in started:
            node.terminate()
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait(timeout=30)
        ray.shutdown()
        head.shutdown()


def test_scale_up_places_the_new_replica_on_the_node_that_joined(
    join_node, tiny_models, smollm2_path, capsys
):
    """The cluster starts on the head alone; a node joins; the new replica can only go there."""
    from cluster.cli import main

    path, _ = tiny_models["llama"]
    cluster = start_cluster("replicas.yaml", path, smollm2_path, "parallel.replicas=1")
    try:
        address = cluster.address
        joined_node = join_node()
        assert main(["scale", "--replicas", "2", "--address", address]) == 0
        assert "added: 1" in capsys.readouterr().out
        workers = cluster.workers()
        assert ray.get(workers[1].node_id.remote(), timeout=60) == joined_node
        assert ray.get(workers[0].node_id.remote(), timeout=60) != joined_node
        assert generate_all(address, PROMPTS[:16])
        with Client(address) as client:
            info = client.server_info()
        new = info.replicas[1]
        assert [w.node_id for w in new.workers] == [joined_node]
        # The core's node's replica listens on loopback, the joined node's on that node's address.
        assert info.replicas[0].workers[0].address.startswith("127.0.0.1:")
        assert not new.workers[0].address.startswith("127.0.0.1:")
        assert new.num_prompt_tokens_computed > 0, "the joined node's replica served nothing"
        joined = [n for n in info.nodes if n.node_id == joined_node]
        assert len(joined) == 1 and joined[0].alive
        assert joined[0].resources[JOINED_RESOURCE] == 1
        assert main(["status", "--address", address]) == 0
        rank = new.workers[0]
        assert f"rank 0: {rank.address} (cpu) pid {rank.pid} on node {joined_node}" in (
            capsys.readouterr().out
        )
    finally:
        cluster.shutdown()
