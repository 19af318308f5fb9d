"""Tensor parallelism through the whole cluster path: two worker actors (gloo) serve each
architecture's tiny random model with the same greedy tokens as HF transformers (and so as
one worker, which tests/worker checks against HF too), batched, including a model with fewer
KV heads than ranks."""

import os

import pytest
import ray
import torch

from cluster.client import Client
from cluster.config import Config
from cluster.launcher import Cluster, replace_sections
from scheduler.sampling_params import SamplingParams
from tests.conftest import TINY_ARCHS, hf_greedy
from worker.threads import available_cores

PROMPTS = [[5, 17, 99, 3], [42] * 9, list(range(30, 53)), [7], [200, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tp2_matches_hf(local_cluster, tiny_models, smollm2_path, arch):
    path, hf = tiny_models[arch]
    config = replace_sections(
        Config(),
        model={"model": str(path), "tokenizer": smollm2_path, "max_model_len": 256},
        parallel={"tensor_parallel_size": 2},
        cache={"num_blocks": 128, "block_size": 8},
        server={"port": 0},
    )
    cluster = Cluster(config)  # on the session's Ray
    try:
        with Client(cluster.start()) as client:
            info = client.server_info().replicas[0]
            assert [w.rank for w in info.workers] == [0, 1]
            if not torch.cuda.is_available():  # the two CPU ranks on this node share its cores
                share = int(os.environ.get("OMP_NUM_THREADS") or max(available_cores() // 2, 1))
                threads = ray.get([w.torch_threads.remote() for w in cluster.workers()])
                assert threads == [share] * 2
            # Ranks on one node meet through a file in rank 0's private directory: no port.
            rendezvous = ray.get(
                cluster.workers()[0].__ray_call__.remote(lambda actor: actor._rendezvous_dir),
                timeout=30,
            )
            assert os.path.exists(os.path.join(rendezvous, "store"))
            params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
            streams = [client.generate(p, params, timeout=300) for p in PROMPTS]
            got = [[t for d in s for t in d.token_ids] for s in streams]
    finally:
        cluster.shutdown()
    assert got == [hf_greedy(hf, p, 10) for p in PROMPTS]
    assert not os.path.exists(rendezvous)  # removed as the workers stopped


def test_the_cpu_workers_of_two_replicas_share_the_cores(local_cluster, tiny_models, smollm2_path):
    """Two replicas, each in an engine core of its own: their CPU workers take half the cores
    each (each core places one of the cluster's two), not all of them each."""
    if torch.cuda.is_available():
        pytest.skip("the workers run on GPUs")
    path, _ = tiny_models["llama"]
    config = replace_sections(
        Config(),
        model={"model": str(path), "tokenizer": smollm2_path, "max_model_len": 64},
        parallel={"replicas": 2, "engine_cores": 2},
        cache={"num_blocks": 32, "block_size": 8},
        server={"port": 0},
    )
    cluster = Cluster(config)  # on the session's Ray
    try:
        with Client(cluster.start()) as client:
            assert len(client.server_info().replicas) == 2
            share = int(os.environ.get("OMP_NUM_THREADS") or max(available_cores() // 2, 1))
            threads = ray.get([w.torch_threads.remote() for w in cluster.workers()], timeout=60)
            assert threads == [share] * 2
    finally:
        cluster.shutdown()
