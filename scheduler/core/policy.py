"""Who goes first: the order of waiting requests, and of running ones (preemption takes the
running request that ranks last).

    fcfs          arrival order
    priority      lower priority value first (vLLM's convention), then arrival
    cache_aware   waiting: longest cached prefix first, then arrival; a request that later
                  arrivals passed over in max_steps_passed_over steps goes first, so none starves
                  running: arrival order

Ties between the completions of one client request (same arrival) go by completion index.
"""

from collections.abc import Callable

from scheduler.config import SchedulerConfig
from scheduler.core.request import Request


class Policy:
    """First come, first served."""

    def rank(self, request: Request) -> tuple:
        """The order of running requests (the last one is preempted first), and of waiting ones:
        the scheduler keeps both queues in this order."""
        return (request.arrival_time, request.index)

    def waiting_order(
        self, waiting: list[Request], cached_tokens: Callable[[Request], int]
    ) -> list[Request]:
        """The order in which waiting requests (in rank order) are admitted; cached_tokens: a
        request's tokens found in the prefix cache. Rank order itself, with no copy: a deep
        queue costs nothing while the batch is full."""
        return waiting

    def admitted(self, waiting: list[Request], admitted: list[Request]) -> None:
        """Told which requests a step admitted, and which still wait."""


class PriorityPolicy(Policy):
    def rank(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time, request.index)


class CacheAwarePolicy(Policy):
    def __init__(self, max_steps_passed_over: int) -> None:
        self.max_steps_passed_over = max_steps_passed_over

    def waiting_order(
        self, waiting: list[Request], cached_tokens: Callable[[Request], int]
    ) -> list[Request]:
        def key(request: Request) -> tuple:
            if request.num_steps_passed_over >= self.max_steps_passed_over:
                return (0, 0, *self.rank(request))  # waited long enough: arrival order
            return (1, -cached_tokens(request), *self.rank(request))

        return sorted(waiting, key=key)

    def admitted(self, waiting: list[Request], admitted: list[Request]) -> None:
        """Counts the steps in which a request was passed over by a later arrival."""
        latest = max(r.arrival_time for r in admitted)
        for request in waiting:
            if request.arrival_time < latest:
                request.num_steps_passed_over += 1


def make_policy(config: SchedulerConfig) -> Policy:
    if config.policy == "priority":
        return PriorityPolicy()
    if config.policy == "cache_aware":
        return CacheAwarePolicy(config.max_steps_passed_over)
    return Policy()
