from protos import worker_pb2
from scheduler.logprobs import unpack_logprobs


def test_rows_unpack_their_own_top_k_and_the_sampled_token_comes_first():
    result = worker_pb2.StepResult(
        request_ids=["a", "b", "c"],
        token_ids=[7, 3, 5],
        sampled_logprobs=[-2.0, -0.1, -0.5],
        sampled_ranks=[3, 1, 1],
        num_top_logprobs=[2, -1, 0],  # b asked for none; c for the sampled token's alone
        top_token_ids=[1, 4],
        top_logprobs=[-0.25, -1.5],  # exact in float32
    )
    a, b, c = unpack_logprobs(result)
    assert [(e.token_id, e.logprob, e.rank) for e in a.entries] == [
        (7, -2.0, 3),
        (1, -0.25, 1),
        (4, -1.5, 2),
    ]
    assert b is None
    assert [(e.token_id, e.logprob, e.rank) for e in c.entries] == [(5, -0.5, 1)]


def test_the_sampled_token_among_the_top_k_is_named_once_with_its_rank():
    result = worker_pb2.StepResult(
        token_ids=[4],
        sampled_logprobs=[-1.5],
        sampled_ranks=[2],
        num_top_logprobs=[2],
        top_token_ids=[1, 4],
        top_logprobs=[-0.25, -1.5],
    )
    [a] = unpack_logprobs(result)
    assert [(e.token_id, e.rank) for e in a.entries] == [(4, 2), (1, 1)]


def test_a_result_without_logprobs_unpacks_to_none_per_token():
    assert unpack_logprobs(worker_pb2.StepResult(token_ids=[1, 2])) == [None, None]
