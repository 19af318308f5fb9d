"""Two frontends in front of one engine core on a local Ray cluster: both serve on one port, and
killing one loses only the streams it carried; the core frees what they held."""

import os
import signal
import time

import grpc
import ray

from cluster.client import make_request
from protos import serving_pb2, serving_pb2_grpc
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO

TIMEOUT = 120
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def fresh_stub(address: str) -> tuple[grpc.Channel, serving_pb2_grpc.ServingStub]:
    """A channel with a connection of its own (so the kernel picks a frontend for it anew)."""
    channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
    return channel, serving_pb2_grpc.ServingStub(channel)


def server_info(address: str) -> serving_pb2.ServerInfoResponse:
    channel, stub = fresh_stub(address)
    with channel:
        return stub.GetServerInfo(serving_pb2.ServerInfoRequest(), timeout=TIMEOUT)


def answer(address: str) -> str:
    channel, stub = fresh_stub(address)
    with channel:
        responses = stub.Generate(make_request(QUESTION, GREEDY), timeout=TIMEOUT)
        return "".join(r.text for r in responses)


def wait_for(condition, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)
    return value


def test_two_frontends_serve_and_one_killed_loses_only_its_stream():
    from cluster.config import load_config
    from cluster.launcher import Cluster

    config = load_config(
        os.path.join(REPO, "configs", "local.yaml"),
        ["server.port=0", "cluster.num_cpus=2", "cache.cpu_cache_gb=0.5", "server.frontends=2"],
    )
    cluster = Cluster(config)
    address = cluster.start()
    try:
        pids = set(ray.get([f.pid.remote() for f in cluster.frontends], timeout=TIMEOUT))
        expected = answer(address)
        assert "Paris" in expected
        # Each connection lands on either frontend: until each has served one.
        for _ in range(40):
            info = server_info(address)
            if all(f.num_requests for f in info.frontends):
                break
            channel, stub = fresh_stub(address)
            with channel:
                one = SamplingParams(temperature=0.0, max_tokens=1)
                list(stub.Generate(make_request("Hi", one), timeout=TIMEOUT))
        assert {f.pid for f in info.frontends} == pids and len(pids) == 2
        assert all(f.num_requests for f in info.frontends), "one frontend served every request"

        channel, stub = fresh_stub(address)
        with channel:
            long = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
            stream = stub.Generate(make_request("Count to ten thousand:", long), timeout=TIMEOUT)
            next(stream)  # in flight through one frontend: kill that one
            [victim] = [f.pid for f in server_info(address).frontends if f.num_unfinished]
            os.kill(victim, signal.SIGKILL)
            start = time.monotonic()
            try:
                for _ in stream:
                    pass
                raise AssertionError("the stream through the killed frontend went on")
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            assert time.monotonic() - start < TIMEOUT / 2

        def freed():
            info = server_info(address)
            [replica] = info.replicas
            in_use = replica.num_blocks - replica.num_free_blocks
            return info if len(info.frontends) == 1 and in_use == 0 else None

        info = wait_for(freed, "the core drops the dead frontend and frees its request's blocks")
        assert [f.pid for f in info.frontends] == list(pids - {victim})
        assert answer(address) == expected
    finally:
        cluster.shutdown()
