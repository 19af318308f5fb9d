"""One step's StepPlan (protos/worker.proto), filled in as the scheduler schedules its requests.

    scheduled in order:  a (new, 9 tokens)   b (decode)   c (decode, new block 12)
    new_requests         [NewRequest(a, its tokens, sampling options, block table)]
    cached_requests      request_ids [b, c]   num_computed_tokens [40, 31]
                         num_scheduled_tokens [1, 1]   num_new_blocks [0, 1]
                         new_block_ids [12]   replace_block_table [False, False]

The cached requests' fields are parallel lists. Most of a step's requests are steady decodes (one
token, no new block): the scheduler appends their id and position directly, without a call each,
and the other fields are filled for them in bulk (a step of steady decodes only, as packed bytes
that the protobuf runtime parses).
"""

from protos import worker_pb2
from scheduler.core.page_table import BlockOps, BlockPairs
from scheduler.core.request import Request


class PlanBuilder:
    """The requests a step schedules, in order, as the fields of its plan.

    A cached request is one token without new blocks unless said otherwise (add_cached): a
    steady decode appends only its id and position to request_ids and num_computed_tokens."""

    def __init__(self) -> None:
        self.new_requests: list[worker_pb2.NewRequest] = []
        # CachedRequests: each request the workers already hold, in order.
        self.request_ids: list[str] = []
        self.num_computed_tokens: list[int] = []
        # The cached requests that are not one token without new blocks: (position in
        # request_ids, num_scheduled_tokens, new blocks, replace_block_table), in order.
        self._others: list[tuple[int, int, list[int], bool]] = []

    def __len__(self) -> int:
        """Requests scheduled so far."""
        return len(self.new_requests) + len(self.request_ids)

    def add_new(self, request: Request, table: list[int], num_tokens: int) -> None:
        """A request the workers do not hold: everything they need of it (before its
        num_computed_tokens counts this step's tokens)."""
        self.new_requests.append(_new_request(request, table, num_tokens))

    def add_cached(
        self, request_id: str, start: int, num_tokens: int, blocks: list[int], replace: bool
    ) -> None:
        """A request the workers hold: num_tokens from position start, blocks appended to its
        table (or its whole table, when replace)."""
        if num_tokens != 1 or blocks or replace:
            self._others.append((len(self.request_ids), num_tokens, blocks, replace))
        self.request_ids.append(request_id)
        self.num_computed_tokens.append(start)

    def build(
        self,
        step_id: int,
        ops: BlockOps,
        finished: list[str],
        preempted: list[str],
        swapped: list[str],
    ) -> worker_pb2.StepPlan:
        """The plan, with the step's block operations and the ids dropped since the last."""
        plan = worker_pb2.StepPlan(
            step_id=step_id,
            new_requests=self.new_requests,
            finished_request_ids=finished,
            preempted_request_ids=preempted,
            swapped_request_ids=swapped,
            swap_out=_block_copies(ops.swap_out),
            swap_in=_block_copies(ops.swap_in),
            block_copies=_block_copies(ops.copies),
        )
        # Filled in place: a CachedRequests given to the constructor would be copied.
        cached = plan.cached_requests
        cached.request_ids.extend(self.request_ids)
        cached.num_computed_tokens.extend(self.num_computed_tokens)
        num_cached = len(self.request_ids)
        if not self._others:  # steady decodes only: the other fields are runs of one value
            if num_cached:
                cached.MergeFromString(_steady_decodes(num_cached))
            return plan
        num_scheduled, num_new, replaced = [1] * num_cached, [0] * num_cached, [False] * num_cached
        new_block_ids: list[int] = []
        for i, n, blocks, replace in self._others:
            num_scheduled[i], num_new[i], replaced[i] = n, len(blocks), replace
            new_block_ids += blocks
        cached.new_block_ids.extend(new_block_ids)
        cached.num_scheduled_tokens.extend(num_scheduled)
        cached.num_new_blocks.extend(num_new)
        cached.replace_block_table.extend(replaced)
        return plan


def _steady_decodes(count: int) -> bytes:
    """CachedRequests' num_scheduled_tokens, num_new_blocks and replace_block_table of `count`
    steady decodes (1, 0, False each) as on the wire: packed fields of one byte a value, made
    and parsed in C, where extending the fields with lists converts them value by value in
    Python (50 ns each: 75 us a plan for the three at 512 requests)."""
    return b"".join(
        _varint(number << 3 | 2) + _varint(count) + value * count
        for number, value in _STEADY_DECODE
    )


# The fields _steady_decodes fills: (field number, a steady decode's value, encoded).
_FIELDS = worker_pb2.CachedRequests.DESCRIPTOR.fields_by_name
_STEADY_DECODE = (
    (_FIELDS["num_scheduled_tokens"].number, b"\x01"),
    (_FIELDS["num_new_blocks"].number, b"\x00"),
    (_FIELDS["replace_block_table"].number, b"\x00"),
)


def _varint(value: int) -> bytes:
    """A non-negative integer in protobuf's base-128 varint encoding."""
    assert value >= 0, value
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _new_request(request: Request, table: list[int], n: int) -> worker_pb2.NewRequest:
    """Everything the workers need of a request they do not hold."""
    params = request.sampling_params
    return worker_pb2.NewRequest(
        request_id=request.request_id,
        token_ids=request.all_token_ids,
        sampling=worker_pb2.SamplingOptions(
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            min_p=params.min_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            min_tokens=params.min_tokens,
            banned_until_min_tokens=(
                sorted({*params.stop_token_ids, *request.eos_token_ids})
                if params.min_tokens
                else []
            ),
            prompt_len=request.num_prompt_tokens,
            logprobs=params.logprobs,
        ),
        block_ids=table,
        num_computed_tokens=request.num_computed_tokens,
        num_scheduled_tokens=n,
    )


def _block_copies(pairs: BlockPairs) -> list[worker_pb2.BlockCopy]:
    return [worker_pb2.BlockCopy(src=src, dst=dst) for src, dst in pairs]
