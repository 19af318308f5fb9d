import dataclasses
import enum
import functools
import time
from dataclasses import dataclass, field

from scheduler.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued: no blocks, or preempted to be recomputed
    RUNNING = "running"  # holds a block table on the device
    SWAPPED = "swapped"  # preempted: its blocks wait in host memory
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in _FINISHED  # a set built once: read for every request every step


_FINISHED = frozenset(
    {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED}
)


@dataclass(eq=False)  # identity: a request is one object, found in queues by `is`
class Request:
    """One completion's state as counters. Its computed tokens catch up with its total tokens:
    prefill, chunked prefill and decode are all "schedule num_tokens - num_computed_tokens".
    With async scheduling the total counts the tokens that steps in flight are sampling too
    (num_pending_tokens): the workers hold them when the next step runs, the scheduler learns
    them a step later.

    The scheduler keeps every token it has learned, so the request can always be recomputed.
    A client request with n > 1 is n of these: the one the client named (index 0) and n - 1
    completions forked from it (parent_id set) that share its prompt's blocks.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    priority: int = 0  # the "priority" policy serves lower values first
    cache_salt: str = ""  # requests share cached prefixes only with the same salt
    owner: str = ""  # who submitted it (a digest of the client's token); "" without tokens
    parent_id: str | None = None  # the request this completion was forked from
    index: int = 0  # which of the client request's n completions
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None  # first admitted to a step: queue time ends
    first_token_time: float | None = None  # first token learned: time to first token
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first admission
    output_token_ids: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_computed_tokens: int = 0
    # Tokens sampled by steps sent to the workers whose results are not learned yet (0, 1 or 2):
    # the workers append them themselves, so a step may compute them before the scheduler knows
    # them. Not in output_token_ids, nor in num_tokens.
    num_pending_tokens: int = 0
    num_preemptions: int = 0
    num_steps_passed_over: int = 0  # steps in which a later arrival was admitted first
    # Chained hashes of the full blocks of all_token_ids, computed as far as the page table asked.
    block_hashes: list[bytes] = field(default_factory=list, repr=False)
    status: RequestStatus = RequestStatus.WAITING

    @property
    def group_id(self) -> str:
        """The client's request id, shared by all n completions."""
        return self.parent_id or self.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @functools.cached_property
    def max_num_tokens(self) -> int:
        """The most tokens this request can reach: its prompt plus every output it may sample
        (fixed for its life: read for every running request every step)."""
        max_tokens = self.sampling_params.max_tokens
        if max_tokens is None:
            return self.max_model_len
        return min(self.num_prompt_tokens + max_tokens, self.max_model_len)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def token_ids(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end], without building all_token_ids."""
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]

    def append_token(self, token_id: int) -> None:
        """Records a sampled token and finishes the request if a token stop
        condition holds; stop strings are the frontends', which see the text."""
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        params = self.sampling_params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED  # stop_reason None, as in vLLM
        elif token_id in params.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            self.stop_reason = token_id
        elif (
            params.max_tokens is not None and len(self.output_token_ids) >= params.max_tokens
        ) or self.num_tokens >= self.max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH

    def fork(self, index: int) -> "Request":
        """Completion `index` of this request, id "<request_id>#<index>": the same prompt,
        sampled on its own (seed + index when seeded), before any output."""
        params = self.sampling_params
        seed = None if params.seed is None else (params.seed + index) % 2**64
        return Request(
            request_id=f"{self.request_id}#{index}",
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=dataclasses.replace(params, n=1, seed=seed),
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            priority=self.priority,
            cache_salt=self.cache_salt,
            owner=self.owner,
            parent_id=self.request_id,
            index=index,
            arrival_time=self.arrival_time,
        )
