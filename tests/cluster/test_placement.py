"""The GPUs each rank's process is shown: its replica's GPUs on its node in rank order, and
which one is its own."""

from cluster.placement import gpus_seen


def test_ranks_on_one_node_see_the_same_list_each_its_own_index():
    assert gpus_seen(["a", "a"], [["3"], ["1"]]) == [(["3", "1"], 0), (["3", "1"], 1)]


def test_ranks_on_other_nodes_stay_apart():
    nodes = ["a", "b", "a", "b"]
    gpus = [["0"], ["0"], ["1"], ["1"]]
    assert gpus_seen(nodes, gpus) == [
        (["0", "1"], 0),
        (["0", "1"], 0),
        (["0", "1"], 1),
        (["0", "1"], 1),
    ]


def test_a_rank_alone_on_its_node_sees_its_own():
    assert gpus_seen(["a", "b"], [["2"], ["5"]]) == [(["2"], 0), (["5"], 0)]
