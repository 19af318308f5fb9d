"""Routing over several replicas from the router's own map of the prefixes it sent each."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.core import block_hash
from scheduler.core.page_table import PageTableManager
from scheduler.core.router import BALANCE_SLACK, Router
from tests.scheduler.core.test_scheduler import make_request

BS = 4
SHARED = list(range(100, 112))  # three full blocks


def router_of(num_replicas, capacity=32, loads=None):
    """A router over replicas 0..num_replicas-1; loads[i] is replica i's load (0 if not given:
    the test changes the dict to change the load)."""
    loads = {} if loads is None else loads
    router = Router(BS)
    for i in range(num_replicas):
        router.add(i, BS, capacity, lambda i=i: loads.get(i, 0))
    return router


def salted(request, salt):
    request.cache_salt = salt
    return request


def test_a_shared_prefix_goes_where_it_went_before_even_to_a_busier_replica():
    loads = {}
    router = router_of(3, loads=loads)
    assert router.route(make_request("a", [*SHARED, 1])) == 0
    loads[0] = 5
    request = make_request("b", [*SHARED, 7, 7])
    assert router.cached_tokens(request) == {0: 12, 1: 0, 2: 0}
    assert router.route(request) == 0
    one_block = make_request("c", [*SHARED[:4], 9, 9, 9, 9, 9])
    assert router.cached_tokens(one_block) == {0: 4, 1: 0, 2: 0}
    # Another salt shares no block; the whole prompt is never cached (its last token computes).
    other_salt = salted(make_request("d", [*SHARED, 1]), "t")
    assert router.cached_tokens(other_salt) == {0: 0, 1: 0, 2: 0}
    assert router.cached_tokens(make_request("e", SHARED))[0] == 8


def test_a_shared_prefix_spills_to_a_second_replica_past_the_balance_bound():
    """Requests sharing a system prompt follow the first one while its replica is at most
    BALANCE_SLACK above the least loaded; past that the next goes by load, and from then on
    both replicas hold the prefix and share the requests by load."""
    loads = {0: BALANCE_SLACK, 1: 0}
    router = router_of(2, loads=loads)
    loads[0] = 0
    assert router.route(make_request("a", [*SHARED, 1])) == 0
    loads[0] = BALANCE_SLACK  # the bound itself: the prefix still counts
    assert router.route(make_request("b", [*SHARED, 2])) == 0
    loads[0] = BALANCE_SLACK + 1
    assert router.route(make_request("c", [*SHARED, 3])) == 1
    assert router.cached_tokens(make_request("d", [*SHARED, 4])) == {0: 12, 1: 12}
    loads[1] = 2  # both cache it now: the least loaded takes it
    loads[0] = 1
    assert router.route(make_request("e", [*SHARED, 5])) == 0
    # The bound grows with the load: half the least loaded's, when more than BALANCE_SLACK.
    other = [200 + t for t in range(12)]
    loads.update({0: 0, 1: 0})
    assert router.route(make_request("f", [*other, 1])) == 0
    loads.update({0: 300, 1: 200})
    assert router.route(make_request("g", [*other, 2])) == 0  # 300 <= 200 + 100
    loads[0] = 301
    assert router.route(make_request("h", [*other, 3])) == 1


def test_ties_go_to_the_least_loaded_replica_then_the_lowest_id():
    loads = {0: 1, 1: 2, 2: 1}
    router = router_of(3, loads=loads)
    assert router.route(make_request("a", 2)) == 0  # nothing cached: 0 and 2 are least loaded
    loads[0] = 3
    assert router.route(make_request("b", 2)) == 2


def test_the_map_keeps_the_most_recently_routed_blocks_and_an_evicted_prefix_attracts_no_more():
    router = router_of(2, capacity=4)
    a, b, c = ([t] * 8 + [0] for t in (1, 2, 3))  # two full blocks each
    assert router.route(make_request("a", a)) == 0
    assert router.route(make_request("b", b)) == 0  # ties go to 0 (both are idle)
    assert router.route(make_request("a2", a)) == 0  # a hit: a's blocks are the newest again
    assert router.cached_tokens(make_request("b2", b)) == {0: 8, 1: 0}
    assert router.route(make_request("c", c)) == 0  # four blocks fit: b's go
    assert router.cached_tokens(make_request("b3", b)) == {0: 0, 1: 0}
    assert router.cached_tokens(make_request("a3", a)) == {0: 8, 1: 0}
    # A chain's later blocks go before its first: a longer one keeps its head.
    long = make_request("long", [5] * 24 + [0])
    router.route(long)
    assert router.cached_tokens(long) == {0: 16, 1: 0}


def test_a_removed_replica_gets_no_new_request_and_an_added_one_does():
    loads = {}
    router = router_of(2, loads=loads)
    request = make_request("r", [*SHARED, 7])
    loads[0] = 1
    assert router.route(request) == 1
    router.remove(1)  # draining: its map goes with it
    assert not router.routes(1)
    assert router.cached_tokens(request) == {0: 0}
    assert router.route(request) == 0
    router.remove(0)  # failed: no replica is left
    assert router.route(request) is None
    router.add(1, BS, 32, lambda: 0)  # recovered, its cache empty
    assert router.routes(1) and router.route(request) == 1
    with pytest.raises(ValueError, match="replica 1 is already routed to"):
        router.add(1, BS, 32, lambda: 0)
    with pytest.raises(ValueError, match="replica 0 is not routed to"):
        router.remove(0)


def test_replicas_must_share_the_routers_block_size_and_have_a_capacity():
    router = Router(BS)
    with pytest.raises(ValueError, match="block size 8 is not the router's 4"):
        router.add(0, 8, 32, lambda: 0)
    with pytest.raises(ValueError, match="capacity must be >= 0, got -1"):
        router.add(0, BS, -1, lambda: 0)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        Router(0)
    assert not router.routes(0)


def test_the_router_and_the_page_table_share_one_list_of_hashes_computed_once(monkeypatch):
    calls = []
    real = block_hash.hash_block
    monkeypatch.setattr(block_hash, "hash_block", lambda *args: calls.append(args) or real(*args))
    router = router_of(2)
    request = salted(make_request("r", [*SHARED, 7]), "t")
    hashes = request.block_hashes
    router.route(request)
    assert len(calls) == 3 and request.block_hashes is hashes and len(hashes) == 3
    assert calls[0][2] == "t" and calls[1][2] == ""  # the salt keys the first block only
    page_table = PageTableManager(32, BS)
    assert page_table.cached_prefix(request) == []
    assert page_table.allocate(request, request.num_tokens)
    assert len(calls) == 3 and request.block_hashes is hashes
    assert page_table.pool.cached.keys() == set(hashes)


def test_without_prefix_caching_nothing_is_hashed_and_load_alone_routes():
    loads = {}
    router = router_of(2, capacity=0, loads=loads)
    first = make_request("a", [*SHARED, 1])
    assert router.route(first) == 0
    loads[0] = 1
    assert router.route(make_request("b", [*SHARED, 1])) == 1
    assert first.block_hashes == []


@settings(max_examples=60, deadline=None)
@given(
    capacities=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("route"), st.lists(st.integers(0, 2), max_size=14)),
            st.tuples(st.just("toggle"), st.integers(0, 3)),
            st.tuples(st.just("load"), st.integers(0, 3)),
        ),
        max_size=30,
    ),
)
def test_route_picks_a_routed_replica_and_no_map_outgrows_its_capacity(capacities, ops):
    loads = {}
    router = Router(BS)
    routed = set(range(len(capacities)))
    for i, capacity in enumerate(capacities):
        router.add(i, BS, capacity, lambda i=i: loads.get(i, 0))
    for n, (op, arg) in enumerate(ops):
        if op == "route":
            replica_id = router.route(make_request(f"r{n}", [*arg, 0]))
            assert replica_id in routed if routed else replica_id is None
        elif op == "load":
            loads[arg] = loads.get(arg, 0) + 1
        elif arg < len(capacities) and arg in routed:
            router.remove(arg)
            routed.remove(arg)
        elif arg < len(capacities):
            router.add(arg, BS, capacities[arg], lambda i=arg: loads.get(i, 0))
            routed.add(arg)
        for i in routed:
            assert len(router._replicas[i].blocks) <= capacities[i]
