"""The LM head's greedy argmax (each rank's best, then one all-gather of the pairs) equals the
argmax of the gathered logits: ties go to the lowest id, a padded last shard never wins, on one
rank and on two (gloo)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.conftest import free_port
from worker import distributed
from worker.layers.embedding import ParallelLMHead

DIM = 8
VOCABS = (7, 16, 31)  # 7 and 31 leave padding in the last of two shards


def _check(vocab: int, seed: int) -> torch.Tensor:
    """This rank's greedy tokens for rows built to stress ties and padding; on rank 0 they are
    checked against the argmax of the gathered logits."""
    head = ParallelLMHead(vocab, DIM)
    gen = torch.Generator().manual_seed(seed)
    head.weight_loader(head.weight, torch.randn(vocab, DIM, generator=gen))
    hidden = torch.randn(6, DIM, generator=gen)
    hidden[0] = 0  # every logit 0: a tie over the whole vocabulary, padding included
    valid = max(min(head.shard, vocab - head.start), 0)  # this rank's columns in the vocabulary
    with torch.no_grad():
        local = head.local_logits(hidden)
        local[1, :valid] = -5.0  # the padding's 0 would win if it were counted
        local[2, : min(3, valid)] = 100.0  # ties within a shard and across shards
        tokens = head.greedy(local)
        logits = head.gather_logits(local)
    if logits is not None:
        assert torch.equal(tokens, logits.argmax(dim=-1)), (tokens, logits.argmax(dim=-1))
    return tokens


@pytest.mark.parametrize("vocab", VOCABS)
def test_greedy_is_the_argmax_on_one_rank(vocab):
    for seed in range(5):
        _check(vocab, seed)


def _two_ranks(rank: int, port: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on a GPU host too (CPU tensors: not NCCL)
    distributed.init(rank, 2, "127.0.0.1", port)
    try:
        for vocab in VOCABS:
            for seed in range(3):
                tokens = _check(vocab, seed)
                both = [torch.empty_like(tokens) for _ in range(2)]
                dist.all_gather(both, tokens)
                assert torch.equal(both[0], both[1]), "the ranks disagree"
    finally:
        distributed.destroy()


def test_greedy_is_the_argmax_on_two_ranks():
    port = free_port()
    mp.start_processes(_two_ranks, args=(port,), nprocs=2, start_method="spawn")
