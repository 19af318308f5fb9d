"""The fleet's recovery from a failed worker, over fake ranks (tests/scheduler/fake_worker.py):
the failed replica's requests continue on the others as recomputes, each stream with no token
duplicated or dropped (a fake rank's tokens follow from the tokens before them, so a stream
is right only if it is exactly the undisturbed sequence); the replica is restarted and serves
again; with none serving, requests wait for it; without a placer they are answered."""

import contextlib
import dataclasses
import gc
import logging
import time
import weakref

import grpc
import pytest

from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig
from scheduler.core import fleet as fleet_module
from scheduler.core.fleet import Fleet
from scheduler.core.replica import EngineConfigs, ReplicaSpec, ReplicaState
from scheduler.core.request import Request
from scheduler.sampling_params import SamplingParams
from tests.scheduler.core.fake_placer import FakePlacer
from tests.scheduler.core.test_engine import Sink, collect, collect_tokens
from tests.scheduler.fake_worker import TIMEOUT, FakeRank, serving

CONFIGS = EngineConfigs(
    ModelConfig(max_model_len=64),
    CacheConfig(block_size=8, num_blocks=64),
    SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=64),
)
MAX_TOKENS = 24


def expected(prompt: int, max_tokens: int = MAX_TOKENS) -> list[int]:
    """What the fake rank answers a prompt of one token, undisturbed (successor())."""
    tokens = [prompt]
    for _ in range(max_tokens):
        tokens.append(tokens[-1] % 9 + 1)
    return tokens[1:]


def request(rid: str, prompt: int, n: int = 1) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=[prompt],
        sampling_params=SamplingParams(temperature=0, max_tokens=MAX_TOKENS, n=n),
        eos_token_ids=frozenset([0]),
        max_model_len=64,
    )


@contextlib.contextmanager
def fleet_of(num_replicas: int, placer: FakePlacer, on_serving=None, configs=CONFIGS):
    fleet = Fleet([placer.place(i) for i in range(num_replicas)], configs, placer, on_serving)
    try:
        yield fleet
    finally:
        fleet.stop()
        for replica_id in list(placer.ranks):
            placer.release(replica_id)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {TIMEOUT} s"
        time.sleep(0.01)


def submit_all(fleet: Fleet, count: int, n: int = 1) -> dict[str, tuple[Sink, int]]:
    """count requests of prompts 1..9 (n completions each); request id -> (its sink, prompt)."""
    sent = {}
    for i in range(count):
        sink, prompt = Sink(), i % 9 + 1
        fleet.submit(request(f"r{i}", prompt, n), sink)
        sent[f"r{i}"] = (sink, prompt)
    return sent


def hold_and_kill(placer: FakePlacer, replica_id: int) -> None:
    """Kills the replica's rank in the middle of a step (steps may be in flight)."""
    rank = placer.ranks[replica_id]
    rank.hold = True
    assert rank.held.wait(TIMEOUT)
    placer.kill(replica_id)


def assert_all_complete(sent: dict[str, tuple[Sink, int]], n: int = 1, got=None) -> None:
    for rid, (sink, prompt) in sent.items():
        completions = collect(sink, rid, n, (got or {}).get(rid))
        for completion in completions.values():
            assert completion.end.finish_reason == "length", completion.end
            assert completion.tokens == expected(prompt), f"{rid}: a token duplicated or lost"


def assert_blocks_free(fleet: Fleet) -> None:
    for replica in fleet.replicas:
        with replica.engine.lock:
            pt = replica.engine.scheduler.page_table
            assert not pt.block_tables and pt.num_free_blocks == pt.num_blocks


def test_a_failed_replicas_requests_finish_on_the_other_and_it_comes_back():
    placer = FakePlacer()
    with fleet_of(2, placer) as fleet:
        sent = submit_all(fleet, 8, n=2)
        got = {rid: {} for rid in sent}
        for rid, (sink, _) in sent.items():
            collect_tokens(sink, rid, 0, 3, got[rid])  # every stream has begun
        victim = fleet.replicas[1]
        assert victim.engine.num_unfinished() > 0
        placer.may_place.clear()  # its restart waits until the test has seen it out of routing
        hold_and_kill(placer, 1)
        wait_for(lambda: victim.state is not ReplicaState.SERVING, "the failure is seen")
        assert not fleet.router.routes(1)
        placer.may_place.set()
        assert_all_complete(sent, n=2, got=got)
        info = fleet.server_info()
        assert info.num_replica_failures == 1 and info.num_recovered_requests > 0
        wait_for(lambda: fleet.replicas[1].state is ReplicaState.SERVING, "replica 1 serves")
        assert fleet.router.routes(1) and placer.num_placed == 3
        # The failed engine's counts stay in the server's (counters never go back).
        engines = [victim.engine] + [r.engine for r in fleet.replicas]
        info = fleet.server_info()
        assert info.num_steps == sum(e.num_steps for e in engines)
        assert info.num_finished_requests == sum(e.num_finished for e in engines) == 8  # requests
        assert victim.engine.num_steps > 0 and fleet.replicas[1].engine is not victim.engine
        again = submit_all(fleet, 4)
        assert_all_complete(again)
        assert_blocks_free(fleet)


def test_a_replaced_replica_is_freed_at_once_not_by_the_cyclic_collector(monkeypatch):
    """A replaced replica holds megabytes (its page table's per-block lists): freed by
    reference counting as soon as its restart is done, the next recovery reuses that memory.
    No cycle holds it: not its engine's failure handler, not the worker's error that ended
    the engine's step."""
    # pytest keeps every log record, and the engine's logged failure holds its frames.
    monkeypatch.setattr(logging.getLogger("scheduler.core.engine"), "disabled", True)
    placer = FakePlacer()
    gc.disable()
    try:
        with fleet_of(2, placer) as fleet:
            replaced = weakref.ref(fleet.replicas[1])
            engine = weakref.ref(fleet.replicas[1].engine)
            sent = submit_all(fleet, 8)
            hold_and_kill(placer, 1)  # its engine waits in a step: the stream's error ends it
            assert_all_complete(sent)
            wait_for(lambda: fleet.replicas[1] is not replaced(), "replica 1 is replaced")
            wait_for(lambda: replaced() is None, "the replaced replica is freed")
            wait_for(lambda: engine() is None, "its engine is freed")
    finally:
        gc.enable()


def test_a_hung_replica_is_failed_by_the_watchdog_and_recovered_as_a_dead_one():
    configs = dataclasses.replace(
        CONFIGS, scheduler=dataclasses.replace(CONFIGS.scheduler, step_timeout_s=0.5)
    )
    placer = FakePlacer()
    with fleet_of(2, placer, configs=configs) as fleet:
        sent = submit_all(fleet, 8)
        got = {rid: {} for rid in sent}
        for rid, (sink, _) in sent.items():
            collect_tokens(sink, rid, 0, 3, got[rid])  # every stream has begun
        victim = placer.ranks[1]
        victim.hold = True  # its next step never ends; its process lives on
        assert victim.held.wait(TIMEOUT)
        assert_all_complete(sent, got=got)
        wait_for(lambda: fleet.replicas[1].state is ReplicaState.SERVING, "replica 1 serves")
        info = fleet.server_info()
        assert info.num_replica_failures == 1 and info.num_recovered_requests > 0
        assert "hangs: worker rank 0" in info.replicas[1].last_failure
        assert "scheduler.step_timeout_s=0.5" in info.replicas[1].last_failure
        assert info.replicas[0].last_failure == ""
        assert victim.release.is_set(), "the hung rank was not killed"
        assert_blocks_free(fleet)


def test_an_idle_replica_that_fails_leaves_routing_and_restarts_after_a_refused_attempt(
    monkeypatch,
):
    monkeypatch.setattr(fleet_module, "RESTART_BACKOFF_S", (0.05,))
    placer = FakePlacer()
    with fleet_of(2, placer) as fleet:
        placer.failures_to_come = 1
        placer.may_place.clear()
        placer.kill(0)  # idle: no step in flight sees it
        wait_for(lambda: not fleet.router.routes(0), "the idle failure is seen")
        assert fleet.server_info().replicas[0].state == "recovering"
        sent = submit_all(fleet, 3)  # all on replica 1
        placer.may_place.set()
        assert_all_complete(sent)
        wait_for(lambda: fleet.replicas[0].state is ReplicaState.SERVING, "replica 0 serves")
        assert placer.num_placed == 3  # the refused attempt placed nothing


def test_with_no_replica_serving_requests_wait_for_the_restarted_one():
    placer, told = FakePlacer(), []
    with fleet_of(1, placer, told.append) as fleet:
        sent = submit_all(fleet, 4)
        got = {rid: {} for rid in sent}
        for rid, (sink, _) in sent.items():
            collect_tokens(sink, rid, 0, 2, got[rid])
        placer.may_place.clear()
        hold_and_kill(placer, 0)
        wait_for(lambda: not fleet.serving(), "the failure is seen")
        assert told == [False]
        late = Sink()
        fleet.submit(request("late", 5), late)  # waits in the fleet too
        placer.may_place.set()
        assert_all_complete({**sent, "late": (late, 5)}, got={**got, "late": {}})
        assert fleet.serving() and told == [False, True]
        assert_blocks_free(fleet)


def test_when_recovery_gives_up_the_waiting_requests_are_answered_unavailable(monkeypatch):
    monkeypatch.setattr(fleet_module, "RESTART_BACKOFF_S", (0.01,))
    placer = FakePlacer()
    with fleet_of(1, placer) as fleet:
        sink = Sink()
        fleet.submit(request("a", 1), sink)
        collect_tokens(sink, "a", 0, 1, got := {})
        placer.failures_to_come = fleet_module.RESTART_ATTEMPTS
        hold_and_kill(placer, 0)
        [completion] = collect(sink, "a", 1, got).values()
        assert completion.end.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "no replica serves (replica 0 failed)" in completion.end.error.message
        assert fleet.server_info().replicas[0].state == "failed"


def test_without_a_placer_the_failed_replicas_requests_are_answered_unavailable():
    rank, server = FakeRank(), contextlib.ExitStack()
    fleet = Fleet([ReplicaSpec((server.enter_context(serving(rank)),), "fake")], CONFIGS)
    try:
        sink, got = Sink(), {}
        fleet.submit(request("a", 1), sink)
        collect_tokens(sink, "a", 0, 2, got)
        rank.hold = True
        assert rank.held.wait(TIMEOUT)
        server.close()
        rank.release.set()
        [completion] = collect(sink, "a", 1, got).values()
        assert completion.end.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "no replica serves (replica 0 failed)" in completion.end.error.message
        with pytest.raises(RuntimeError, match="no replica serves"):
            fleet.submit(request("b", 2), Sink())
        assert fleet.server_info().replicas[0].state == "failed"
    finally:
        fleet.stop()
        server.close()


def test_a_request_failed_before_its_first_token_forks_its_completions_on_the_other_replica():
    placer = FakePlacer()
    with fleet_of(2, placer) as fleet:
        placer.ranks[0].hold = True  # an idle fleet routes to replica 0 first
        sent = submit_all(fleet, 1, n=3)
        assert placer.ranks[0].held.wait(TIMEOUT)  # its prompt's step: nothing learned yet
        placer.kill(0)
        assert_all_complete(sent, n=3)
        assert placer.ranks[1].sampled["r0#1"] == MAX_TOKENS  # forked there, sampled there


def test_a_request_waiting_for_a_replica_can_be_aborted_and_ends_every_completion():
    placer = FakePlacer()
    with fleet_of(1, placer) as fleet:
        placer.may_place.clear()
        placer.kill(0)
        wait_for(lambda: not fleet.serving(), "the failure is seen")
        sink = Sink()
        fleet.submit(request("a", 1, n=2), sink)
        assert fleet.num_unfinished(sink) == 1
        assert fleet.abort("a")
        ends = collect(sink, "a", 2)
        assert [ends[i].end.finish_reason for i in (0, 1)] == ["abort", "abort"]
        assert fleet.num_unfinished(sink) == 0
        placer.may_place.set()


def test_a_drained_replicas_steps_stay_in_the_servers_counts():
    placer = FakePlacer(graphs=True)
    with fleet_of(2, placer) as fleet:
        assert_all_complete(submit_all(fleet, 8))
        before = fleet.server_info()
        assert {r.replica_id for r in before.replicas} == {0, 1}
        assert all(r.engine.num_steps > 0 for r in fleet.replicas)  # both stepped
        fleet.scale(1)
        wait_for(lambda: len(fleet.replicas) == 1, "replica 1 drains and stops")
        after = fleet.server_info()
    assert 0 < before.num_graph_steps < before.num_steps and before.step_seconds > 0
    assert before.num_graph_steps + before.num_piecewise_steps == before.num_steps
    # Nothing ran since, and nothing of the drained replica was lost.
    counts = ("num_steps", "num_graph_steps", "num_piecewise_steps")
    assert [getattr(after, c) for c in counts] == [getattr(before, c) for c in counts]
    assert after.step_seconds == pytest.approx(before.step_seconds)
