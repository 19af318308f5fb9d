"""Routing over several replicas' page tables."""

import threading

import pytest

from scheduler.config import SchedulerConfig
from scheduler.core.page_table import PageTableManager
from scheduler.core.router import BALANCE_SLACK, Router
from scheduler.core.scheduler import Scheduler
from tests.scheduler.core.test_scheduler import make_request


def replicas(count, block_size=4):
    return [
        Scheduler(SchedulerConfig().for_device(gpu=False), PageTableManager(32, block_size))
        for _ in range(count)
    ]


def cache_prompt(scheduler, tokens):
    """Runs a request through the replica's page table so its full blocks stay cached."""
    request = make_request("warm", tokens)
    assert scheduler.page_table.allocate(request, len(tokens))
    scheduler.page_table.free(request.request_id)


def test_a_request_goes_to_the_replica_with_its_longest_cached_prefix():
    schedulers = replicas(3)
    shared = list(range(100, 112))
    cache_prompt(schedulers[1], shared[:4] + [1] * 8)  # one block of the prefix
    cache_prompt(schedulers[2], shared + [2])  # three blocks
    table = Router(schedulers)
    request = make_request("r", shared + [7, 7])
    assert table.cached_tokens(request) == {0: 0, 1: 4, 2: 12}
    assert table.route(request) == 2


def test_ties_go_to_the_least_loaded_replica_then_the_first():
    schedulers = replicas(3)
    table = Router(schedulers)
    assert table.route(make_request("a", 5)) == 0
    schedulers[0].add_request(make_request("busy0", 5))
    schedulers[1].add_request(make_request("busy1", 5, n=2))  # two completions
    assert table.route(make_request("b", 5)) == 2
    schedulers[2].add_request(make_request("busy2", 5))
    assert table.route(make_request("c", 5)) == 0
    # A cached prefix outweighs load.
    cache_prompt(schedulers[1], list(range(10, 15)))
    assert table.route(make_request("d", 6)) == 1


def test_routing_reads_each_replica_under_its_lock():
    schedulers = replicas(2)
    locks = [threading.Lock(), threading.Lock()]
    table = Router(schedulers, locks)
    with locks[1]:
        done = threading.Event()
        worker = threading.Thread(target=lambda: (table.route(make_request("a", 5)), done.set()))
        worker.start()
        assert not done.wait(0.2)  # blocked on replica 1's lock
    worker.join(5)
    assert done.is_set()


def test_replicas_must_share_a_block_size():
    with pytest.raises(ValueError, match="block size"):
        Router([*replicas(1, block_size=4), *replicas(1, block_size=8)])
    with pytest.raises(ValueError, match="at least one"):
        Router([])


def test_a_removed_replica_gets_no_new_request_and_an_added_one_does():
    schedulers = replicas(3)
    shared = list(range(100, 112))
    cache_prompt(schedulers[2], shared + [2])
    table = Router(schedulers[:2])
    table.add(7, schedulers[2])
    request = make_request("r", shared + [7, 7])
    assert table.route(request) == 7  # the added replica caches the prefix
    table.remove(7)  # draining: its cache no longer attracts anything
    assert table.cached_tokens(request) == {0: 0, 1: 0}
    assert table.route(request) == 0
    table.remove(0)
    assert table.route(request) == 1
    table.remove(1)  # failed: no replica is left
    assert table.route(request) is None
    table.add(1, schedulers[1])  # recovered
    assert table.route(request) == 1
    with pytest.raises(ValueError, match="already"):
        table.add(1, schedulers[1])
    with pytest.raises(ValueError, match="block size"):
        table.add(8, *replicas(1, block_size=8))


def test_a_cached_prefix_counts_only_within_the_balance_bound():
    """Requests sharing a system prompt go to the replica caching it while it is at most
    BALANCE_SLACK above the least loaded; past that, by load (and the bound grows with the
    load: half the least loaded's, when more)."""
    schedulers = replicas(2)
    shared = list(range(100, 112))
    cache_prompt(schedulers[0], shared + [1])
    table = Router(schedulers)
    for i in range(BALANCE_SLACK):
        schedulers[0].add_request(make_request(f"busy{i}", 5))
    assert table.route(make_request("a", shared + [2])) == 0  # at the bound: the cache counts
    schedulers[0].add_request(make_request("one more", 5))
    assert table.route(make_request("b", shared + [3])) == 1  # past it: by load
    for i in range(300 - BALANCE_SLACK - 1):
        schedulers[0].add_request(make_request(f"more{i}", 5))
    for i in range(200):
        schedulers[1].add_request(make_request(f"other{i}", 5))
    assert table.route(make_request("c", shared + [4])) == 0  # 300 <= 200 + 100
    schedulers[0].add_request(make_request("301st", 5))
    assert table.route(make_request("d", shared + [5])) == 1
