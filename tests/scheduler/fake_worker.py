"""A worker without a model, for driving the scheduler in tests; FakeRank serves it over gRPC
as rank 0 of a replica, for the engine and the engine core.

It applies each StepPlan the way worker/model_runner.py does (the diff of request state, then
swap out, swap in, copy, then the step) to a simulated KV cache whose slots hold token ids
instead of K/V vectors. After the step's writes it checks that every scheduled request finds its
whole context (every token before its last scheduled one) in its block table: a block handed to
two requests, a missed copy-on-write, a wrong prefix-cache hit or a lost swap shows up as a
wrong token in some slot.
"""

import contextlib
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from cluster.benchmarks.modelless_rank import ModellessRank
from protos import worker_pb2, worker_pb2_grpc
from protos.keepalive import SERVER_OPTIONS
from protos.step_plan import cached_requests

TIMEOUT = 10  # seconds any wait of a test on a fake rank may take


class FakeWorker:
    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.device: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.host: list[list[int | None]] = [[None] * block_size for _ in range(num_host_blocks)]
        self.tables: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def execute(self, plan: worker_pb2.StepPlan) -> list[str]:
        """Runs the plan; returns the ids of the requests that sample a token this step."""
        for rid in (*plan.finished_request_ids, *plan.preempted_request_ids):
            self.tables.pop(rid, None)
            self.tokens.pop(rid, None)
            self.computed.pop(rid, None)
        for rid in plan.swapped_request_ids:
            self.tables[rid] = []
        _apply(plan.swap_out, self.device, self.host)
        _apply(plan.swap_in, self.host, self.device)
        copy_srcs = {p.src for p in plan.block_copies}
        assert not copy_srcs & {p.dst for p in plan.block_copies}, "a copy reads a copy's target"
        _apply(plan.block_copies, self.device, self.device)
        scheduled = []
        for new in plan.new_requests:
            assert new.request_id not in self.tables, f"{new.request_id} sent twice"
            self.tables[new.request_id] = list(new.block_ids)
            self.tokens[new.request_id] = list(new.token_ids)
            self.computed[new.request_id] = new.num_computed_tokens
            scheduled.append((new.request_id, new.num_scheduled_tokens))
        for cached in cached_requests(plan):
            rid = cached.request_id
            assert self.computed[rid] == cached.num_computed_tokens, f"{rid}: counts differ"
            if cached.replace_block_table:
                self.tables[rid] = list(cached.new_block_ids)
            else:
                self.tables[rid].extend(cached.new_block_ids)
            scheduled.append((rid, cached.num_scheduled_tokens))
        for rid, n in scheduled:  # the forward pass writes every new token first ...
            start = self.computed[rid]
            assert n >= 1 and start + n <= len(self.tokens[rid]), f"{rid}: {n} tokens past its end"
            for pos in range(start, start + n):
                self._slot(rid, pos)[pos % self.block_size] = self.tokens[rid][pos]
        for rid, n in scheduled:  # ... then each token attends over its whole context
            end = self.computed[rid] + n
            context = [self._slot(rid, pos)[pos % self.block_size] for pos in range(end)]
            assert context == self.tokens[rid][:end], f"{rid}: its KV cache holds other tokens"
            self.computed[rid] = end
        return [rid for rid, _ in scheduled if self.computed[rid] == len(self.tokens[rid])]

    def learn(self, request_id: str, token: int) -> None:
        """Rank 0 sampled token for the request; every rank appends it."""
        self.tokens[request_id].append(token)

    def _slot(self, request_id: str, pos: int) -> list[int | None]:
        return self.device[self.tables[request_id][pos // self.block_size]]


def _apply(pairs, source: list[list[int | None]], target: list[list[int | None]]) -> None:
    """target[dst] = source[src] for every pair at once, as torch's indexed copy does."""
    dsts = [p.dst for p in pairs]
    assert len(set(dsts)) == len(dsts), "two operations write one block"
    values = [list(source[p.src]) for p in pairs]
    for dst, value in zip(dsts, values, strict=True):
        target[dst] = value


def successor(tokens: list[int]) -> int:
    """The token after the request's last one: 1, 2, 3, ..., 9, 1, ... (never 0)."""
    return tokens[-1] % 9 + 1


class FakeRank(ModellessRank):
    """Answers each plan like rank 0: each request that samples gets token(its tokens so far),
    counted in `sampled`. With `hold` set, the next step waits for `release` (and sets `held`
    first). With `logprobs` set, every token comes with logprob -token / 10 and rank 1 (no
    top k). With `graphs` set, a step of decodes alone says it replayed a CUDA graph, any other
    the graphs in pieces. Bring-up
    RPCs answer as a model of `vocab_size` tokens would."""

    def __init__(
        self,
        num_blocks: int = 64,
        num_host_blocks: int = 0,
        token: Callable[[list[int]], int] = successor,
        block_size: int = 4,
        vocab_size: int = 10,
    ) -> None:
        super().__init__("Fake", vocab_size, max_model_len=64)
        self.worker = FakeWorker(num_blocks, block_size, num_host_blocks)
        self.token = token
        self.sampled: Counter[str] = Counter()  # completion id -> tokens sampled for it
        self.hold = False
        self.logprobs = False
        self.graphs = False
        self.held = threading.Event()
        self.release = threading.Event()

    def Execute(self, request_iterator, context):
        for plan in request_iterator:
            if self.hold:
                self.held.set()
                assert self.release.wait(TIMEOUT)
            yield self.answer(plan)

    def answer(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        ids = self.worker.execute(plan)
        tokens = [self.token(self.worker.tokens[rid]) for rid in ids]
        for rid, token in zip(ids, tokens, strict=True):
            self.worker.learn(rid, token)
            self.sampled[rid] += 1
        result = worker_pb2.StepResult(step_id=plan.step_id, request_ids=ids, token_ids=tokens)
        counts = plan.cached_requests.num_scheduled_tokens
        result.cuda_graph = self.graphs and not plan.new_requests and set(counts) == {1}
        result.piecewise_graph = self.graphs and not result.cuda_graph
        if self.logprobs:
            result.sampled_logprobs.extend(-t / 10 for t in tokens)
            result.sampled_ranks.extend([1] * len(tokens))
            result.num_top_logprobs.extend([0] * len(tokens))
        return result


@contextlib.contextmanager
def serving(rank: worker_pb2_grpc.WorkerServicer) -> Iterator[str]:
    """The rank on a gRPC server on a free local port, taking the core's keepalive pings as a
    worker's does; yields its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    worker_pb2_grpc.add_WorkerServicer_to_server(rank, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
