"""The scheduling policy of one replica: continuous batching under a token budget.

Each step spends max_num_batched_tokens (and at most max_num_seqs requests), in this order:

1. Running requests, in policy rank order. Each gets num_tokens + num_pending_tokens -
   num_computed_tokens, capped by what is left of the budget (and by
   long_prefill_token_threshold, when set), so a long prompt is prefilled in chunks across
   steps while decodes (the one-token case) keep going. When blocks run out, the
   running request that ranks last is preempted: swapped to host memory if recomputing it would
   take more than a step's budget and the swap space has room, else recomputed later from the
   tokens the scheduler keeps.
2. Swapped requests, in rank order, when their blocks fit again.
3. Waiting requests, in the policy's order, each starting after its longest cached prefix.
   Nothing is admitted in a step that preempted: blocks are short.

Async scheduling: the engine plans step N+1 before it learns step N's tokens (update()), so up
to two steps are in flight. The workers run plans in order and append each sampled token
themselves, so step N+1 can compute the token step N samples without the scheduler knowing it:
a request counts the tokens sampled by steps in flight (num_pending_tokens) as its own, and
  - is not scheduled once those reach its length limit (its last token is on the way);
  - when preempted, is not sent again (a NewRequest holding its known tokens) before its
    pending tokens are learned, or the workers would sample one of them twice;
  - when it ends on a token learned from step N (EOS, a stop token or string), may already be
    in step N+1: the workers sample one more token for it, which update() discards. Its blocks
    are freed at once; N+1 writes only the slot of its last token, in a block it held alone and
    that was never in the prefix cache (page_table.py hashes known tokens only), and the plans
    that hand the block out again run after N+1.
With synchronous scheduling (one step in flight) nothing is ever pending at schedule().

A client request with n > 1 enters as its first completion; once its prompt is computed (its
first token learned), the other n - 1 fork from it, sharing the prompt's blocks, and each
recomputes the last prompt token to sample its own first token.

The plan sent to the workers is a diff: a request's tokens, sampling options and block table
once (NewRequest); afterwards only its new blocks and token counts (CachedRequests, parallel
arrays over the requests); plus the ids finished, preempted or swapped since the last plan, and
the step's block copies and swaps.
"""

import time
from bisect import insort
from collections.abc import Sequence

from protos import worker_pb2
from scheduler.config import SchedulerConfig
from scheduler.core.page_table import PageTableManager
from scheduler.core.plan_builder import PlanBuilder
from scheduler.core.policy import make_policy
from scheduler.core.request import Request, RequestStatus
from scheduler.core.stats import SchedulerStats


class RequestRefused(ValueError):
    """The request can never run on this replica; it is refused at once, never left waiting."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, page_table: PageTableManager) -> None:
        """config: its sizes set (SchedulerConfig.for_device fills the ones a YAML leaves)."""
        if config.max_num_seqs is None or config.max_num_batched_tokens is None:
            raise ValueError("scheduler sizes unset: resolve the config with for_device(gpu)")
        self.config = config
        self.page_table = page_table
        self.policy = make_policy(config)
        self.stats = SchedulerStats()
        self.requests: dict[str, Request] = {}  # every unfinished completion, by its own id
        self.groups: dict[str, list[Request]] = {}  # client request id -> unfinished completions
        self.waiting: list[Request] = []  # in policy rank order
        self.running: list[Request] = []  # in policy rank order
        self.swapped: list[Request] = []  # in policy rank order
        self._unforked: dict[str, list[Request]] = {}  # parent id -> completions still to fork
        self._step_id = 0
        self._num_blocks_sent: dict[str, int] = {}  # requests the workers hold -> table length
        self._dropped: list[str] = []  # finished or aborted since the last plan
        self._preempted: list[str] = []  # preempted (to recompute) since the last plan
        self._swapped_ids: list[str] = []  # swapped out since the last plan
        # Finished requests' tokens still to come from steps in flight: id -> count. update()
        # drops them, even when a new request took the id meanwhile: the old tokens come first.
        self._discarded: dict[str, int] = {}
        # Every token that ends some request added here (a superset of the live ones' own:
        # it never shrinks), so that update() looks at a request's own only on such a token.
        self._ending_token_ids: set[int] = set()

    def add_request(self, request: Request) -> list[Request]:
        """Queues a client request; returns its n completions (the request itself first).

        Raises ValueError if an id is in use, RequestRefused if it can never fit this replica.
        """
        params = request.sampling_params
        if params.n > self.config.max_num_seqs:  # before a fork is built: n may be 2**31 - 1
            raise RequestRefused(
                f"n={params.n} completions exceed scheduler.max_num_seqs="
                f"{self.config.max_num_seqs}, the requests one step can hold"
            )
        completions = [request] + [request.fork(i) for i in range(1, params.n)]
        self._check_fits(completions)
        self._ending_token_ids.update(*(c.ending_token_ids for c in completions))
        for completion in completions:
            self.requests[completion.request_id] = completion
        self.groups[request.request_id] = list(completions)
        if params.n > 1:
            self._unforked[request.request_id] = completions[1:]
        insort(self.waiting, request, key=self.policy.rank)
        return completions

    def adopt(self, completions: list[Request]) -> None:
        """Queues a client request's unfinished completions that a failed replica held, to be
        recomputed here as a preempted request is: each from its prompt and the outputs learned
        so far (its blocks allocated afresh, its prefix cache looked up). Completions that had
        not forked (their parent's first token was not learned) fork from it again.

        Raises as add_request does (ValueError, RequestRefused)."""
        self._check_fits(completions)
        self._ending_token_ids.update(*(c.ending_token_ids for c in completions))
        group_id = completions[0].group_id
        parent = next((c for c in completions if c.request_id == group_id), None)
        unforked = []
        for completion in completions:
            completion.num_computed_tokens = 0
            completion.num_pending_tokens = 0  # never learned: the steps sample them again
            completion.status = RequestStatus.WAITING
            self.requests[completion.request_id] = completion
            if parent is not None and completion is not parent and not parent.output_token_ids:
                unforked.append(completion)  # forked only once the parent's first token is
            else:
                insort(self.waiting, completion, key=self.policy.rank)
        self.groups[group_id] = list(completions)
        if unforked:
            self._unforked[group_id] = unforked

    def release_all(self) -> dict[str, list[Request]]:
        """Lets go of every unfinished request (the replica failed: adopt() queues them
        elsewhere) and frees their blocks; returns them by client request id."""
        groups = self.groups
        for request_id in self.requests:
            self.page_table.free(request_id)
        self.requests, self.groups, self._unforked = {}, {}, {}
        self.waiting, self.running, self.swapped = [], [], []
        self._num_blocks_sent.clear()
        self._discarded.clear()
        self._dropped, self._preempted, self._swapped_ids = [], [], []
        return groups

    def _check_fits(self, completions: list[Request]) -> None:
        """Raises ValueError if an id is in use, RequestRefused if the request can never fit
        this replica's cache."""
        request = completions[0]
        if request.group_id in self.groups or any(
            c.request_id in self.requests for c in completions
        ):
            raise ValueError(f"request_id {request.group_id!r} is already in use")
        pt = self.page_table
        num_blocks = pt.blocks_for(request.max_num_tokens - 1)  # the last token is never computed
        if num_blocks > pt.num_blocks:
            raise RequestRefused(
                f"the request needs up to {num_blocks} KV cache blocks ({request.max_num_tokens} "
                f"tokens: its prompt plus max_tokens) but the cache holds {pt.num_blocks}; "
                "lower max_tokens or shorten the prompt"
            )

    def stop_request(self, request: Request, stop_reason: str) -> None:
        """Finishes a completion whose text reached a stop string. One that ended on the same
        token (its length, EOS) is relabeled "stop" with this reason, as vLLM does; an aborted
        one stays aborted."""
        if request.status is RequestStatus.FINISHED_ABORTED:
            return
        request.stop_reason = stop_reason
        if self.requests.get(request.request_id) is request:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        else:
            request.status = RequestStatus.FINISHED_STOPPED

    def abort_request(self, request_id: str) -> list[Request]:
        """Aborts every unfinished completion of a client request; returns them."""
        aborted = list(self.groups.get(request_id, ()))
        for request in aborted:
            self._finish(request, RequestStatus.FINISHED_ABORTED)
        return aborted

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self, skip_empty: bool = False) -> worker_pb2.StepPlan | None:
        """Plans one step; advances num_computed_tokens of every scheduled request.

        Every running request below its length limit has a token to compute: the rest of its
        prompt, or the token it sampled last (learned by update(), or still pending: the
        workers have it when this step runs). With skip_empty, a step that would compute
        nothing and move no block is not planned: None, and the finished and preempted ids it
        would carry wait for the next plan (the engine does so while a step is in flight).
        """
        plan = PlanBuilder()
        num_preemptions = self.stats.num_preemptions
        budget = self._schedule_running(self.config.max_num_batched_tokens, plan)
        if self.stats.num_preemptions == num_preemptions:
            budget = self._resume_swapped(budget, plan)
            self._admit_waiting(budget, plan)
        if skip_empty and not plan and not self.page_table.has_block_ops():
            return None
        self._step_id += 1
        plan_msg = plan.build(
            self._step_id,
            self.page_table.take_block_ops(),
            self._dropped,
            self._preempted,
            self._swapped_ids,
        )
        self._dropped, self._preempted, self._swapped_ids = [], [], []
        return plan_msg

    def _chunk(self, remaining: int, budget: int) -> int:
        """The tokens a request with `remaining` left to compute gets this step: what is left of
        the budget, and no more than long_prefill_token_threshold when it has more left."""
        threshold = self.config.long_prefill_token_threshold
        if 0 < threshold < remaining:
            remaining = threshold
        return min(remaining, budget)

    def _schedule_running(self, budget: int, plan: PlanBuilder) -> int:
        """Schedules the running requests in rank order, preempting the last-ranked ones when
        blocks run out; returns the budget left.

        Most are steady decodes: one token past the prompt into the table's decode window
        (page_table.py), so no block to allocate and nothing new for the workers: their plan
        entry is appended here, with a few attribute reads each. Any other goes through
        allocate() and _schedule(), which give a steady decode the same entry."""
        running, allocate = self.running, self.page_table.allocate
        window_of = self.page_table.decode_windows.get
        add_id, add_position = plan.request_ids.append, plan.num_computed_tokens.append
        # Preemption removes requests after the current one only: iterating stays in order.
        for request in running:
            if budget <= 0:
                break
            start = request.num_computed_tokens
            num_prompt = request.num_prompt_tokens
            num_known = num_prompt + len(request.output_token_ids)
            num_tokens = num_known + request.num_pending_tokens
            if num_tokens >= request.max_num_tokens:
                continue  # its last token is being sampled: it ends when that is learned
            if num_tokens - start == 1 and start >= num_prompt:
                rid = request.request_id
                window = window_of(rid)
                # allocate()'s own window test, for the one token [start, start + 1).
                if window is not None:
                    lo, hi, full = window
                    if lo <= start < hi and (start < full or num_known <= full):
                        add_id(rid)
                        add_position(start)
                        request.num_computed_tokens = num_tokens
                        request.num_pending_tokens += 1  # it samples in this step
                        budget -= 1
                        continue
            n = self._chunk(num_tokens - start, budget)
            if not allocate(request, n) and not self._preempt_to_allocate(request, n):
                break
            self._schedule(request, n, plan)
            budget -= n
        return budget

    def update(
        self, request_ids: Sequence[str], token_ids: Sequence[int]
    ) -> tuple[list[Request], Sequence[int], list[Request]]:
        """Learns the tokens of a step, the oldest step in flight; returns the live requests
        and their tokens (parallel lists: token_ids itself when every id is live) and those of
        them that finished, in the same order. Forks the completions of a request that learned
        its first token, and finishes those that hit a stop condition.

        A request samples once a step, so each id appears once: every request is looked up
        before any is learned (one map), as learning one changes what no other id finds. Most
        tokens neither end their request nor are its first: those are appended inline, the
        rest go through Request.append_token."""
        requests = list(map(self.requests.get, request_ids))
        discarded, unforked = self._discarded, self._unforked
        if discarded and not discarded.keys().isdisjoint(request_ids):
            for i, rid in enumerate(request_ids):
                count = discarded.get(rid)
                if count is None:
                    continue
                # It ended after this step was planned: its token is dropped, even when a new
                # request took the id meanwhile (the old tokens come first).
                if count == 1:
                    del discarded[rid]
                else:
                    discarded[rid] = count - 1
                requests[i] = None
        # A superset of the tokens that end some request: most steps sample none of them.
        ending = self._ending_token_ids
        finished = []
        live = True  # every id found a request
        for request, token in zip(requests, token_ids, strict=True):
            if request is None:  # discarded, or an id no step of this scheduler samples for
                live = False
                continue
            request.num_pending_tokens -= 1
            output = request.output_token_ids
            # What append_token does when the token does not end the request (its length, a
            # stop token) and is not its first (timed; a parent whose completions wait to fork
            # has learned none, so its first token forks them below).
            if (
                len(output) + 1 < request.max_num_outputs
                and request.first_token_time is not None
                and not (token in ending and token in request.ending_token_ids)
            ):
                output.append(token)
                continue
            ended = request.append_token(token)
            if unforked and request.request_id in unforked:
                self._fork(request)
            if ended:
                self._finish(request, request.status)
                finished.append(request)
        if live:
            return requests, token_ids, finished
        kept = [i for i, request in enumerate(requests) if request is not None]
        return [requests[i] for i in kept], [token_ids[i] for i in kept], finished

    def preempt(self, request: Request) -> None:
        """Takes a running request off the device: to host memory when recomputing it would
        take more than one step's token budget and the swap space has room, else back to the
        waiting queue to be recomputed from its tokens."""
        self.running.remove(request)
        self.stats.num_preemptions += 1
        request.num_preemptions += 1
        rid = request.request_id
        worth_swapping = request.num_computed_tokens > self.config.max_num_batched_tokens
        if worth_swapping and rid in self._num_blocks_sent and self.page_table.swap_out(request):
            self.stats.num_swapped_out += 1
            request.status = RequestStatus.SWAPPED
            insort(self.swapped, request, key=self.policy.rank)
            self._swapped_ids.append(rid)
            return
        self.page_table.free(rid)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        insort(self.waiting, request, key=self.policy.rank)
        if self._num_blocks_sent.pop(rid, None) is not None:
            self._preempted.append(rid)

    def _preempt_to_allocate(self, request: Request, num_tokens: int) -> bool:
        """Preempts the last-ranked running requests until the request's next tokens fit;
        False if it had to preempt the request itself."""
        while True:
            victim = self.running[-1]
            self.preempt(victim)
            if victim is request:
                return False
            if self.page_table.allocate(request, num_tokens):
                return True

    def _seats_taken(self) -> int:
        """Running requests, plus the completions still to fork from running ones."""
        return len(self.running) + sum(
            len(children)
            for parent_id, children in self._unforked.items()
            if self.requests[parent_id].status is RequestStatus.RUNNING
        )

    def _seats_needed(self, request: Request) -> int:
        """The request, and the completions that will fork from it."""
        return 1 + len(self._unforked.get(request.request_id, ()))

    def _resume_swapped(self, budget: int, plan: PlanBuilder) -> int:
        seats = self.config.max_num_seqs - self._seats_taken()
        while self.swapped and budget > 0:
            request = self.swapped[0]
            if request.num_pending_tokens:
                break  # swapped out while a step samples for it: back once that is learned
            needs = self._seats_needed(request)
            n = self._chunk(request.num_tokens - request.num_computed_tokens, budget)
            if needs > seats or not self.page_table.swap_in(request, n):
                break
            del self.swapped[0]
            request.status = RequestStatus.RUNNING
            insort(self.running, request, key=self.policy.rank)
            self._schedule(request, n, plan)
            budget -= n
            seats -= needs
        return budget

    def _admit_waiting(self, budget: int, plan: PlanBuilder) -> None:
        pt = self.page_table
        seats = self.config.max_num_seqs - self._seats_taken()
        if not self.waiting or budget <= 0 or seats <= 0:
            return  # nothing can be admitted: spare ordering a deep queue every step
        admitted = []
        # Not changed while its order is walked (may be self.waiting itself): admitted below.
        for request in self.policy.waiting_order(
            self.waiting, lambda r: len(pt.cached_prefix(r)) * pt.block_size
        ):
            if request.num_pending_tokens:
                # Preempted while a step samples for it: sent now with its known tokens, the
                # workers would sample that token again. Admitted once it is learned.
                continue
            needs = self._seats_needed(request)
            if budget <= 0 or needs > seats:
                break
            cached = pt.cached_prefix(request)
            num_cached = len(cached) * pt.block_size
            n = self._chunk(request.num_tokens - num_cached, budget)
            if not pt.allocate(request, n, cached):
                break
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            insort(self.running, request, key=self.policy.rank)
            self.stats.prefix_cache_queries += request.num_tokens
            self.stats.prefix_cache_hits += num_cached
            self._schedule(request, n, plan)
            admitted.append(request)
            budget -= n
            seats -= needs
        for request in admitted:
            self.waiting.remove(request)
        if admitted:
            self.policy.admitted(self.waiting, admitted)

    def _fork(self, parent: Request) -> None:
        """The parent's prompt is computed: its other completions share its blocks and run.

        If the parent was preempted after the step that sampled its first token was planned
        (async scheduling), its blocks are gone: the others wait to compute the prompt
        themselves (the prefix cache may hold it)."""
        children = self._unforked.pop(parent.request_id)
        if parent.request_id not in self.page_table.block_tables:
            for child in children:
                insort(self.waiting, child, key=self.policy.rank)
            return
        for child in children:
            self.page_table.fork(parent, child)
            # Its first token is sampled from the last prompt token's logits: compute that again.
            child.num_computed_tokens = child.num_prompt_tokens - 1
            child.status = RequestStatus.RUNNING
            insort(self.running, child, key=self.policy.rank)

    def _schedule(self, request: Request, n: int, plan: PlanBuilder) -> None:
        """Puts the request's next n tokens, allocated, in the plan: the whole request if the
        workers do not hold it, else its new blocks (its whole table, when rewritten)."""
        rid = request.request_id
        start = request.num_computed_tokens
        table = self.page_table.block_tables[rid]
        num_sent = self._num_blocks_sent.get(rid)
        if num_sent is None:
            plan.add_new(request, table, n)
        else:
            replace = self.page_table.is_rewritten(rid)
            plan.add_cached(rid, start, n, table if replace else table[num_sent:], replace)
        self._num_blocks_sent[rid] = len(table)
        num_prompt = len(request.prompt_token_ids)
        if start < num_prompt:
            self.stats.num_prompt_tokens_computed += min(start + n, num_prompt) - start
        request.num_computed_tokens = start + n
        num_tokens = num_prompt + len(request.output_token_ids) + request.num_pending_tokens
        if start + n == num_tokens:
            request.num_pending_tokens += 1  # it samples in this step

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        rid = request.request_id
        del self.requests[rid]
        group = self.groups[request.group_id]
        group.remove(request)
        if not group:
            del self.groups[request.group_id]
        self._unforked.pop(rid, None)  # aborted before its prompt was computed
        for queue in (self.running, self.waiting, self.swapped):
            if request in queue:
                queue.remove(request)
                break
        self.page_table.free(rid)
        if request.num_pending_tokens:  # steps in flight still sample for it
            self._discarded[rid] = self._discarded.get(rid, 0) + request.num_pending_tokens
            request.num_pending_tokens = 0
        if self._num_blocks_sent.pop(rid, None) is not None:
            self._dropped.append(rid)
            if rid in self._swapped_ids:  # swapped out and gone since the last plan
                self._swapped_ids.remove(rid)
