"""Scaling on a simulated two-node Ray (fake GPUs, gloo, a tiny random Llama): 1 -> 2 -> 1
replicas under streaming load loses no request and changes no output; with two engine cores the
count is split over them; a cancelled stream's
blocks are free again within one step; Scale refuses what it cannot do with a clear status."""

import functools
import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import ray

from cluster.client import Client
from protos import serving_pb2, serving_pb2_grpc
from scheduler.sampling_params import SamplingParams
from tests.cluster.conftest import PROMPTS, generate_all, start_cluster

TIMEOUT = 300


def _scale(address: str, replicas: int) -> serving_pb2.ScaleResponse:
    with grpc.insecure_channel(address) as channel:
        stub = serving_pb2_grpc.ServingStub(channel)
        return stub.Scale(serving_pb2.ScaleRequest(replicas=replicas), timeout=TIMEOUT)


def _wait_for(condition, what: str, timeout: float = 60.0):
    """Polls condition() until it returns something true; returns that."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)
    return result


def test_scaling_1_2_1_under_streaming_load_loses_nothing_and_changes_nothing(
    two_nodes, tiny_models, smollm2_path
):
    """48 greedy streams: 12 before the scale-up, 12 during it, 12 between it and the scale-down
    (the new replica serves some of them, and still holds some when it starts to drain), 12
    after it. Every stream ends complete, with the tokens the same request got on the fixed
    one-replica cluster before any scaling."""
    path, _ = tiny_models["llama"]
    prompts = PROMPTS[:48]
    max_tokens = 48
    cluster = start_cluster("replicas.yaml", path, smollm2_path, "parallel.replicas=1")
    try:
        address = cluster.address
        expected = generate_all(address, prompts, max_tokens)
        assert all(len(tokens) == max_tokens for tokens in expected)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        with Client(address) as client, ThreadPoolExecutor(max_workers=48) as pool:

            def stream(i: int) -> list[int]:
                deltas = client.generate(prompts[i], params, f"load-{i}", timeout=TIMEOUT)
                return [t for d in deltas for t in d.token_ids]

            results = [pool.submit(stream, i) for i in range(12)]
            scaling_up = pool.submit(_scale, address, 2)
            for i in range(12, 24):  # while the new replica is placed and loads the model
                results.append(pool.submit(stream, i))
                time.sleep(0.1)
            up = scaling_up.result(timeout=TIMEOUT)
            assert list(up.serving) == [0, 1] and list(up.added) == [1]
            assert not up.draining
            new_workers = cluster.workers()[1:]
            results += [pool.submit(stream, i) for i in range(24, 36)]

            def replica_1_busy():
                replicas = client.server_info().replicas
                return replicas[1].num_running > 0 and replicas

            before_drain = _wait_for(replica_1_busy, "the new replica runs requests")
            down = _scale(address, 1)
            results += [pool.submit(stream, i) for i in range(36, 48)]
            got = [r.result(timeout=TIMEOUT) for r in results]
        assert before_drain[1].state == "serving"
        assert list(down.serving) == [0] and list(down.draining) == [1] and not down.added
        assert down.num_draining_requests > 0, "the drained replica held no request"
        assert got == expected

        with Client(address) as client:
            info = _wait_for(
                lambda: (i := client.server_info()) and len(i.replicas) == 1 and i,
                "the drained replica stops",
            )
        assert info.replicas[0].replica_id == 0 and info.replicas[0].state == "serving"
        assert info.num_finished_requests == 2 * len(prompts)  # the drained replica's count too
        with pytest.raises(ray.exceptions.RayActorError):  # its worker is gone ...
            ray.get(new_workers[0].pid.remote(), timeout=60)
        groups = ray.util.placement_group_table().values()  # ... and so is its placement group
        assert [g["state"] for g in groups].count("CREATED") == 1
        # Requests that came after the scale-down all went to replica 0, the one left.
        after = {f"load-{i}" for i in range(36, 48)}
        seen = {rid for r in cluster.step_records() for rid in r["new_request_ids"]}
        assert after <= seen
    finally:
        cluster.shutdown()
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())


def test_scale_splits_the_replicas_over_two_engine_cores_and_changes_no_output(
    two_nodes, tiny_models, smollm2_path
):
    """Two replicas, each in an engine core of its own: Scale to 3 places the third in the
    first core (the count split as at start), Scale to 2 drains it, Scale to 1 is refused (each
    core keeps one); greedy outputs stay those of the start."""
    path, _ = tiny_models["llama"]
    prompts = PROMPTS[:16]
    cluster = start_cluster(
        "replicas.yaml", path, smollm2_path, "parallel.replicas=2", "parallel.engine_cores=2"
    )
    try:
        address = cluster.address
        assert len(cluster.schedulers) == 2
        expected = generate_all(address, prompts, 12)
        up = _scale(address, 3)
        assert list(up.serving) == [0, 1, 2] and list(up.added) == [2]  # core 0's second
        assert generate_all(address, prompts, 12) == expected
        down = _scale(address, 2)
        assert list(down.serving) == [0, 1] and list(down.draining) == [2]
        with Client(address) as client:
            _wait_for(lambda: len(client.server_info().replicas) == 2, "replica 2 stops")
        with pytest.raises(grpc.RpcError) as refused:
            _scale(address, 1)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "2 engine cores" in refused.value.details()
        assert generate_all(address, prompts, 12) == expected
    finally:
        cluster.shutdown()


def test_a_cancelled_stream_frees_its_blocks_within_one_step(two_nodes, tiny_models, smollm2_path):
    """Two replicas, one per node: a stream cancelled after its first token leaves no request
    and no block held once the server learns of it; the replica's next plan drops it on the
    workers, and no step schedules it again."""
    path, _ = tiny_models["llama"]
    cluster = start_cluster("replicas.yaml", path, smollm2_path)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        with Client(cluster.address) as client:
            stream = client.generate(PROMPTS[0], params, "to-cancel", timeout=TIMEOUT)
            next(stream)
            stream.cancel()

            def all_free():
                replicas = client.server_info().replicas
                return all(
                    r.num_running == r.num_waiting == 0 and r.num_free_blocks == r.num_blocks
                    for r in replicas
                )

            _wait_for(all_free, "the cancelled request's blocks are freed", timeout=30)
            assert not client.abort("to-cancel"), "the scheduler still holds the request"
            # The same prompt goes to the replica that caches it: its first plan drops the
            # cancelled request on the workers.
            short = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
            assert list(client.generate(PROMPTS[0], short, timeout=TIMEOUT))[-1].finish_reason
        records = cluster.step_records()
        assert sum("to-cancel" in r["scheduled"] for r in records) < 50, "the request ran on"
        dropped = next(i for i, r in enumerate(records) if "to-cancel" in r["dropped_request_ids"])
        assert not any("to-cancel" in r["scheduled"] for r in records[dropped:])
    finally:
        cluster.shutdown()


def test_scale_refuses_bad_counts_and_servers_without_a_placer(tiny_models, smollm2_path, tmp_path):
    """An engine core built directly (no Ray, no placer) over an in-process worker, a frontend
    in front of it."""
    from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
    from scheduler.core.engine_core import EngineCore
    from scheduler.core.replica import EngineConfigs, ReplicaSpec
    from scheduler.frontend.server import FrontendServer
    from scheduler.frontend.tokenizer import Tokenizer
    from worker.worker import WorkerServer

    path, _ = tiny_models["llama"]
    worker = WorkerServer()
    core = EngineCore("tiny")
    frontend = None
    try:
        frontend = FrontendServer(
            ServerConfig(port=0, http_port=0),
            [core.address],
            functools.partial(Tokenizer, smollm2_path),
            "tiny",
            str(tmp_path),
        )
        core.start(
            [ReplicaSpec((worker.address,), str(path))],
            EngineConfigs(
                ModelConfig(model=str(path), tokenizer=smollm2_path, max_model_len=256),
                CacheConfig(block_size=8, num_blocks=64),
                SchedulerConfig().for_device(gpu=False),
            ),
        )
        frontend.wait_ready(timeout=60)
        with grpc.insecure_channel(frontend.address) as channel:
            scale = serving_pb2_grpc.ServingStub(channel).Scale
            for replicas, code, words in [
                (0, grpc.StatusCode.INVALID_ARGUMENT, "replicas must be >= 1"),
                (2, grpc.StatusCode.FAILED_PRECONDITION, "without a placer"),
            ]:
                with pytest.raises(grpc.RpcError) as err:
                    scale(serving_pb2.ScaleRequest(replicas=replicas), timeout=30)
                assert err.value.code() == code and words in err.value.details()
            info = serving_pb2_grpc.ServingStub(channel).GetServerInfo(
                serving_pb2.ServerInfoRequest(), timeout=30
            )
        assert not info.nodes and [r.state for r in info.replicas] == ["serving"]
    finally:
        if frontend is not None:
            frontend.stop()
        core.stop()
        worker.stop()


def test_scale_and_status_through_the_cli_then_shutdown_stops_everything(
    two_nodes, tiny_models, smollm2_path, capsys
):
    """`pagedserve scale` adds a replica, `pagedserve status` shows nodes, replicas, workers and
    throughput (generated tokens over the window); Cluster.shutdown stops the workers placed at
    start and those Scale placed."""
    from cluster.cli import main

    path, _ = tiny_models["llama"]
    cluster = start_cluster("replicas.yaml", path, smollm2_path, "parallel.replicas=1")
    try:
        address = cluster.address
        assert main(["scale", "--replicas", "2", "--address", address]) == 0
        assert "serving replicas: 0, 1\nadded: 1\n" in capsys.readouterr().out
        generate_all(address, PROMPTS[:8], max_tokens=20)
        with Client(address) as client:
            info = client.server_info()
        assert main(["status", "--address", address]) == 0
        status = capsys.readouterr().out
        workers = cluster.workers()
    finally:
        cluster.shutdown()
    # At most every token in the window (all of them unless the run outlasted it).
    assert info.num_generated_tokens == 8 * 20
    assert 0 < info.generated_tokens_per_s <= 8 * 20 / info.throughput_window_s + 1e-6
    replica_rates = sum(r.generated_tokens_per_s for r in info.replicas)
    assert replica_rates == pytest.approx(info.generated_tokens_per_s)
    alive = {n.node_id for n in info.nodes if n.alive}
    assert len(alive) == 3
    for node_id in alive:
        assert f"node {node_id} " in status
    for r in info.replicas:
        assert f"replica {r.replica_id} (serving): KV " in status
        worker = r.workers[0]
        assert worker.node_id in alive
        assert worker.pid > 0
        assert (
            f"rank 0: {worker.address} ({worker.device}) pid {worker.pid} on node {worker.node_id}"
            in status
        )
    assert re.search(r"\d+\.\d tokens/s over the last 10 s", status)
    assert len(workers) == 2
    for worker in workers:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(worker.pid.remote(), timeout=60)
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values())
