"""cluster.benchmarks.grpc_accept, tiny: its turn counts agree with the time the loop's work
takes, and every call is counted once."""

from cluster.benchmarks import grpc_accept


def test_turns_counted_are_the_loops_busy_turns():
    calls, callbacks, us = 6, 10, 1000.0  # 10 ms of work a turn
    r = grpc_accept.run(calls, callbacks, us)
    # Every turn between the first and the last call's start ran its 10 ms of callbacks.
    assert r["turns"] >= 1 and r["seconds"] >= r["turns"] * callbacks * us / 1e6
    assert r["turns_per_call"] == r["turns"] / (calls - 1)
    assert 1 <= r["most_in_a_turn"] <= calls


def test_several_servers_share_the_port():
    r = grpc_accept.run(calls=16, callbacks=0, callback_us=0.0, servers=2)
    assert r["seconds"] > 0 and 1 <= r["most_in_a_turn"] <= 16
