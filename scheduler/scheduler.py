"""The scheduling policy of one replica: continuous batching under a token budget.

Each step spends max_num_batched_tokens on running requests first (oldest first), then on
waiting ones (first come, first served). A request is given num_tokens - num_computed_tokens,
capped by what is left of the budget, so a long prompt is prefilled in chunks across steps and a
decode is the one-token case. When the page table runs out of blocks, the latest running request
is preempted (its blocks freed; it is recomputed later from the tokens the scheduler keeps).

The plan sent to the workers is a diff: a request's tokens, sampling options and block table
once (NewRequest); afterwards only its new blocks and token counts (CachedRequest).
"""

from collections import deque

from protos import worker_pb2
from scheduler.config import SchedulerConfig
from scheduler.page_table import PageTableManager
from scheduler.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, page_table: PageTableManager) -> None:
        self.config = config
        self.page_table = page_table
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._step_id = 0
        self._on_workers: set[str] = set()  # requests whose state the workers hold
        self._dropped: list[str] = []  # finished or aborted since the last plan
        self._preempted: list[str] = []  # preempted since the last plan

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is not None:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> worker_pb2.StepPlan:
        """Plans one step; advances num_computed_tokens of every scheduled request."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int, list[int]]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self.page_table.allocate(
                request.request_id, request.num_computed_tokens + n
            )
            while new_blocks is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
                new_blocks = self.page_table.allocate(
                    request.request_id, request.num_computed_tokens + n
                )
            if new_blocks is None:
                break
            scheduled.append((request, n, new_blocks))
            budget -= n
            i += 1
        while (
            self.waiting
            and not preempted
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            new_blocks = self.page_table.allocate(
                request.request_id, request.num_computed_tokens + n
            )
            if new_blocks is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append((request, n, new_blocks))
            budget -= n
        return self._make_plan(scheduled)

    def update(self, request_ids: list[str], token_ids: list[int]) -> list[tuple[Request, int]]:
        """Learns the tokens of a step; returns (request, token) for each live request, and
        finishes those that hit a stop condition."""
        updates = []
        for rid, token in zip(request_ids, token_ids, strict=True):
            request = self.requests.get(rid)
            if request is None:  # aborted while the step ran: its token is discarded
                continue
            request.append_token(token)
            if request.status.finished:
                self._finish(request, request.status)
            updates.append((request, token))
        return updates

    def _make_plan(self, scheduled: list[tuple[Request, int, list[int]]]) -> worker_pb2.StepPlan:
        self._step_id += 1
        plan = worker_pb2.StepPlan(
            step_id=self._step_id,
            finished_request_ids=self._dropped,
            preempted_request_ids=self._preempted,
        )
        self._dropped, self._preempted = [], []
        for request, n, new_blocks in scheduled:
            rid = request.request_id
            if rid in self._on_workers:
                plan.cached_requests.append(
                    worker_pb2.CachedRequest(
                        request_id=rid,
                        new_block_ids=new_blocks,
                        num_computed_tokens=request.num_computed_tokens,
                        num_scheduled_tokens=n,
                    )
                )
            else:
                params = request.sampling_params
                plan.new_requests.append(
                    worker_pb2.NewRequest(
                        request_id=rid,
                        token_ids=request.all_token_ids,
                        sampling=worker_pb2.SamplingOptions(
                            temperature=params.temperature,
                            top_p=params.top_p,
                            top_k=params.top_k,
                            seed=params.seed,
                        ),
                        block_ids=self.page_table.block_tables[rid],
                        num_computed_tokens=request.num_computed_tokens,
                        num_scheduled_tokens=n,
                    )
                )
                self._on_workers.add(rid)
            request.num_computed_tokens += n
        return plan

    def _preempt(self, request: Request) -> None:
        self.page_table.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        if request.request_id in self._on_workers:
            self._on_workers.discard(request.request_id)
            self._preempted.append(request.request_id)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        del self.requests[request.request_id]
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.page_table.free(request.request_id)
        if request.request_id in self._on_workers:
            self._on_workers.discard(request.request_id)
            self._dropped.append(request.request_id)
