import dataclasses
import enum
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

    def __init__(self, value: str) -> None:
        # A plain attribute of each member, read for every request every step (an Enum's
        # hash, for a set of the finished ones, is a Python call).
        self.finished: bool = value in ("stop", "length", "abort")


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
    # Fixed for its life and read for every request every step, so plain attributes set once:
    # a cached_property would store into the instance's __dict__, which makes every attribute
    # access of the object several times slower (CPython 3.11).
    group_id: str = field(init=False)  # the client's request id, shared by all n completions
    num_prompt_tokens: int = field(init=False, repr=False)  # len(prompt_token_ids)
    # The most tokens it can reach: its prompt plus every output it may sample.
    max_num_tokens: int = field(init=False, repr=False)
    max_num_outputs: int = field(init=False, repr=False)  # max_num_tokens less the prompt
    # The tokens that end it when sampled: its EOS tokens (unless ignore_eos) and stop tokens.
    ending_token_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.group_id = self.parent_id or self.request_id
        self.num_prompt_tokens = len(self.prompt_token_ids)
        params = self.sampling_params
        eos = () if params.ignore_eos else self.eos_token_ids
        self.ending_token_ids = frozenset(params.stop_token_ids).union(eos)
        max_tokens = params.max_tokens
        self.max_num_tokens = (
            self.max_model_len
            if max_tokens is None
            else min(self.num_prompt_tokens + max_tokens, self.max_model_len)
        )
        self.max_num_outputs = self.max_num_tokens - self.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

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

    def append_token(self, token_id: int) -> bool:
        """Records a sampled token and finishes the request if a token stop condition holds
        (stop strings are the frontends', which see the text); whether it finished."""
        output = self.output_token_ids
        output.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        if token_id in self.ending_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            if self.sampling_params.ignore_eos or token_id not in self.eos_token_ids:
                self.stop_reason = token_id  # a stop token; EOS leaves None, as in vLLM
            return True
        if len(self.prompt_token_ids) + len(output) >= self.max_num_tokens:
            self.status = RequestStatus.FINISHED_LENGTH  # max_tokens or max_model_len
            return True
        return False

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
