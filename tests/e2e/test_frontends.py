"""Two frontends in front of one engine core on a local Ray cluster: both serve the gRPC and the
OpenAI-compatible HTTP API on shared ports (the official openai client, streamed and not), a
scrape of either's /metrics counts every request both served, a spread client alternates
between their own ports, and killing one, or stopping one (SIGSTOP), loses only the streams it
carried; the core frees what they held, and a killed frontend of the cluster's is started again
and serves."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from cluster.client import make_request
from protos import serving_pb2, serving_pb2_grpc
from scheduler.sampling_params import SamplingParams
from tests.conftest import REPO, running_cluster

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


def server_info_or_none(address: str) -> serving_pb2.ServerInfoResponse | None:
    """server_info, or None where the connection landed on a frontend that was killed: until
    its listening socket is gone the kernel may hand it a new connection (or had queued one
    for it while it was stopped), which is reset: UNAVAILABLE, as a client retrying would see."""
    try:
        return server_info(address)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


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


@pytest.fixture(scope="module")
def cluster():
    """The embedded default behind two frontends (killed one by the module's last test)."""
    from cluster.config import load_config

    config = load_config(
        os.path.join(REPO, "configs", "local.yaml"),
        [
            "server.port=0",
            "server.http_port=0",
            "cluster.num_cpus=2",
            "cache.cpu_cache_gb=0.5",
            "server.frontends=2",
        ],
    )
    yield from running_cluster(config)


def chat(cluster, max_tokens: int = GREEDY.max_tokens, **kwargs):
    """A chat completion of the question through the HTTP API, on a connection of its own (a
    streamed one read to its end: the chunks)."""
    with openai.OpenAI(base_url=f"{cluster.http_url}/v1", api_key="none") as client:
        reply = client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=QUESTION,
            temperature=0.0,
            max_tokens=max_tokens,
            timeout=TIMEOUT,
            **kwargs,
        )
        return list(reply) if kwargs.get("stream") else reply


def test_the_openai_client_chats_streamed_and_not(cluster):
    whole = chat(cluster)
    text = whole.choices[0].message.content
    assert "Paris" in text
    assert 0 < whole.usage.completion_tokens <= GREEDY.max_tokens
    chunks = chat(cluster, stream=True, stream_options={"include_usage": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert text == answer(cluster.address)  # gRPC answers the same


def ttft_count(cluster) -> float:
    """The time-to-first-token histogram's count, from /metrics on a connection of its own."""
    reply = httpx.get(f"{cluster.http_url}/metrics", timeout=TIMEOUT)
    reply.raise_for_status()
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name == "pagedserve:time_to_first_token_seconds_count":
                return sample.value
    raise AssertionError("/metrics has no pagedserve:time_to_first_token_seconds")


def test_metrics_count_every_request_of_both_frontends(cluster):
    before = ttft_count(cluster)
    served = {f.pid: f.num_requests for f in server_info(cluster.address).frontends}
    assert len(served) == 2
    sent = 0
    one = SamplingParams(temperature=0.0, max_tokens=1)
    # Each connection lands on either frontend: until both have served one of these.
    while sent < 40:
        if sent % 2:
            chat(cluster, max_tokens=1)
        else:
            channel, stub = fresh_stub(cluster.address)
            with channel:
                list(stub.Generate(make_request("Hi", one), timeout=TIMEOUT))
        sent += 1
        now = {f.pid: f.num_requests for f in server_info(cluster.address).frontends}
        if sent >= 4 and all(now[pid] > served[pid] for pid in served):
            break
    assert all(now[pid] > served[pid] for pid in served), "one frontend served every request"
    # Every scrape lands on either frontend; each must count all of them.
    counts = {ttft_count(cluster) for _ in range(8)}
    assert counts == {before + sent}, (counts, before, sent)


def test_a_spread_client_sends_its_generates_to_both_frontends_in_turn(cluster):
    """One connection lands on one frontend; spread() gives the client each frontend's own port
    (GetServerInfo) and its Generates alternate between them."""
    from cluster.client import Client

    before = {f.pid: f.num_requests for f in server_info(cluster.address).frontends}
    assert all(f.port for f in server_info(cluster.address).frontends)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    with Client(cluster.address) as client:
        assert client.spread(timeout=TIMEOUT) == 2
        for _ in range(6):
            assert len([r for r in client.generate("Hi", one, timeout=TIMEOUT)]) == 1
    after = {f.pid: f.num_requests for f in server_info(cluster.address).frontends}
    assert {pid: after[pid] - before[pid] for pid in before} == dict.fromkeys(before, 3)


def blocks_in_use(info: serving_pb2.ServerInfoResponse) -> int:
    [replica] = info.replicas
    return replica.num_blocks - replica.num_free_blocks


def open_streams_until(address: str, carried_by) -> list[tuple[grpc.Channel, object]]:
    """Long streams on connections of their own (the kernel picks each one's frontend), each
    read to its first token, until carried_by(frontends' {pid: unfinished}) holds."""
    long = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    streams = []
    for i in range(16):
        channel, stub = fresh_stub(address)
        stream = stub.Generate(make_request(f"Count to {i + 10}:", long), timeout=TIMEOUT)
        next(stream)
        streams.append((channel, stream))
        if carried_by({f.pid: f.num_unfinished for f in server_info(address).frontends}):
            return streams
    raise AssertionError("16 connections and the frontends never carried the streams wanted")


def extra_frontend(cluster):
    """One more frontend actor on the cluster's ports, as the launcher starts them; serving."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cluster.actors import FrontendActor

    core_addresses = ray.get([s.address.remote() for s in cluster.schedulers], timeout=TIMEOUT)
    ports = ray.get(cluster.frontends[0].ports.remote(), timeout=TIMEOUT)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    frontend = FrontendActor.options(num_cpus=0, scheduling_strategy=here).remote(
        cluster.config,
        core_addresses,
        cluster.secret,
        cluster.tokenizer_path,
        cluster.metrics_dir,
        ports,
    )
    ray.get(frontend.wait_ready.remote(TIMEOUT), timeout=TIMEOUT)
    return frontend


def test_a_stopped_frontend_is_found_its_requests_freed_and_it_is_killed(cluster):
    """SIGSTOP keeps the frontend's connections open: only its silence on the core's stream
    shows the hang. A third frontend is stopped, so that the module's two serve on."""
    address = cluster.address
    expected = answer(address)
    baseline = blocks_in_use(server_info(address))
    frontend = extra_frontend(cluster)
    try:
        pid = ray.get(frontend.pid.remote(), timeout=TIMEOUT)
        streams = open_streams_until(address, lambda carried: carried.get(pid, 0) > 0)
        carried = {f.pid: f.num_unfinished for f in server_info(address).frontends}
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()

        def dropped():
            info = server_info_or_none(address)
            return info if info and pid not in {f.pid for f in info.frontends} else None

        info = wait_for(dropped, "the core drops the stopped frontend")
        found_s = time.monotonic() - stopped
        [replica] = info.replicas
        others = sum(n for p, n in carried.items() if p != pid)
        assert replica.num_running + replica.num_waiting + replica.num_swapped == others
        assert found_s < 10, f"found after {found_s:.1f} s (heartbeat timeout 5 s)"
        # The core killed it: the actor is gone, so a new client lands on a live frontend.
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(frontend.pid.remote(), timeout=TIMEOUT)
        assert answer(address) == expected
        for channel, _ in streams:
            channel.close()
        wait_for(
            lambda: blocks_in_use(server_info(address)) == baseline,
            "every block is back at its baseline",
        )
    finally:
        ray.kill(frontend)  # stopped or not, nothing is left behind


def test_two_frontends_serve_and_one_killed_loses_only_its_streams(cluster):
    address = cluster.address
    pids = set(ray.get([f.pid.remote() for f in cluster.frontends], timeout=TIMEOUT))
    expected = answer(address)
    assert "Paris" in expected
    baseline = blocks_in_use(server_info(address))
    # Streams on connections of their own, until each frontend carries one (the kernel picks).
    streams = open_streams_until(address, lambda carried: all(carried.values()))
    carried = {f.pid: f.num_unfinished for f in server_info(address).frontends}
    assert carried.keys() == pids and all(carried.values()), "one frontend took every stream"
    # The victim is the first frontend: the one the shared ports were given to (server.port 0).
    victim, survivor = ray.get([f.pid.remote() for f in cluster.frontends], timeout=TIMEOUT)
    os.kill(victim, signal.SIGKILL)

    def dropped():
        info = server_info_or_none(address)
        if info is None or victim in {f.pid for f in info.frontends}:
            return None
        [replica] = info.replicas
        held = replica.num_running + replica.num_waiting + replica.num_swapped
        return info if held == carried[survivor] else None

    # The dead frontend's requests are aborted in the core; the survivor's still run (beside
    # it, the dead one's restart may have connected already, with nothing of its own yet).
    info = wait_for(dropped, "the core drops the dead frontend and aborts its requests")
    unfinished = {f.pid: f.num_unfinished for f in info.frontends}
    assert unfinished.pop(survivor) == carried[survivor]
    assert list(unfinished.values()) in ([], [0])
    # Which streams go on: a stream of the dead frontend breaks once its client has read what
    # had reached it before the kill (which can be many tokens); a survivor's stream still
    # delivers seconds after the core dropped the dead frontend. Read all at once.
    settled = time.monotonic() + 2.0

    def goes_on(stream) -> bool:
        try:
            while time.monotonic() < settled:
                assert not next(stream).finish_reason
            return True
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            return False

    with ThreadPoolExecutor(len(streams)) as pool:
        going_on = list(pool.map(goes_on, [stream for _, stream in streams]))
    kept = [channel for (channel, _), on in zip(streams, going_on, strict=True) if on]
    lost = [channel for (channel, _), on in zip(streams, going_on, strict=True) if not on]
    assert (len(lost), len(kept)) == (carried[victim], carried[survivor])
    assert answer(address) == expected  # a new request is served meanwhile
    for channel in lost + kept:
        channel.close()  # the survivor's clients leave: their requests are aborted too
    wait_for(
        lambda: blocks_in_use(server_info(address)) == baseline,
        "every block is back at its baseline",
    )
    # Ray started the killed frontend again: it connected to the core as a new frontend, and
    # answers on its own port and takes connections on the shared one as the first did.
    restarted = wait_for(
        lambda: {f.pid for f in server_info(address).frontends} - pids,
        "the killed frontend is started again",
    )
    [new_pid] = restarted
    assert ray.get([f.pid.remote() for f in cluster.frontends], timeout=TIMEOUT) == [
        new_pid,
        survivor,
    ]
    own_port = {f.pid: f.port for f in server_info(address).frontends}[new_pid]
    assert answer(f"{address.rsplit(':', 1)[0]}:{own_port}") == expected
    streams = open_streams_until(address, lambda carried: carried.get(new_pid, 0) > 0)
    assert sorted(f.pid for f in server_info(address).frontends) == sorted([new_pid, survivor])
    for channel, _ in streams:
        channel.close()
