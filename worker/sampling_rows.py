"""The sampler's per-row parameters as host arrays, set once when a request takes its row, so
that a step gathers its sampling rows' parameters with numpy and moves them in one copy (it
read every request's options field by field in Python, and copied each field on its own).

Row r is the request's row of RequestRows and BlockTables. Per row:

    params      [7, num_rows] float32   temperature (0 = greedy), top_p (1 = off), top_k (0 or
                                        less = off; exact as a float below 2^24, and any value
                                        past the vocabulary is off), min_p (0 = off), presence,
                                        frequency and repetition (1 = off) penalties
    seed        [num_rows] uint64       its generator's seed, where seeded
    seeded      [num_rows] bool
    prompt_len  [num_rows] int64        the prompt's share of its tokens: the rest are outputs
    min_tokens  [num_rows] int64        its banned tokens stay banned until this many outputs
    logprobs    [num_rows] int64        the top logprobs it asks for; -1 = none
    banned      {row: [k] int64}        those banned tokens (EOS, stop ids), rows with some only
    penalized   [num_rows] bool         it samples with presence / frequency / repetition
    plain_greedy [num_rows] bool        greedy with nothing else asked (no logprobs, penalties
                                        or bans): its token is the LM head's argmax, no sampler
    slot        [num_rows] int64        its penalty slot on the device; 0: none yet

A free row has penalized and plain_greedy False.

A step's batch:  params[:, rows] -> one host-to-device copy -> a view a parameter

A penalized row's token counts live on the device, in a slot of its own, from its first
sampling step to its release:

    counts       [slots, vocab] float32  its output tokens' occurrences
    prompt_mask  [slots, vocab] bool     the tokens of its prompt
    (slot 0 stays empty: the rows without penalties read it)

A slot is filled from the row's tokens on the host when it first samples (a request resumed
after a preemption brings its outputs), then each step that samples the row adds its token on
the device, in stream order: the next step's penalties count it while it is still on its way
to the host, and no step walks a row's history again.
"""

import numpy as np
import torch

from protos import worker_pb2
from worker.request_rows import RequestRows
from worker.sampler import GREEDY_EPS, Penalties, SamplingBatch, draw_seed
from worker.step_staging import to_device_async

TEMPERATURE, TOP_P, TOP_K, MIN_P, PRESENCE, FREQUENCY, REPETITION = range(7)


class SamplingRows:
    def __init__(self, num_rows: int = 64) -> None:
        self.params = np.zeros((7, num_rows), dtype=np.float32)
        self.seed = np.zeros(num_rows, dtype=np.uint64)
        self.seeded = np.zeros(num_rows, dtype=bool)
        self.prompt_len = np.zeros(num_rows, dtype=np.int64)
        self.min_tokens = np.zeros(num_rows, dtype=np.int64)
        self.logprobs = np.full(num_rows, -1, dtype=np.int64)
        self.banned: dict[int, np.ndarray] = {}
        self.penalized = np.zeros(num_rows, dtype=bool)
        self.plain_greedy = np.zeros(num_rows, dtype=bool)
        self.slot = np.zeros(num_rows, dtype=np.int64)
        self.counts: torch.Tensor | None = None  # made at the first penalized row's step
        self.prompt_mask: torch.Tensor | None = None
        self.free_slots: list[int] = []

    def _grow(self, num_rows: int) -> None:
        old = len(self.seed)
        if num_rows <= old:
            return
        grown = max(num_rows, 2 * old)
        params = np.zeros((7, grown), dtype=np.float32)
        params[:, :old] = self.params
        self.params = params
        for name, fill in (
            ("seed", 0),
            ("seeded", False),
            ("prompt_len", 0),
            ("min_tokens", 0),
            ("logprobs", -1),
            ("penalized", False),
            ("plain_greedy", False),
            ("slot", 0),
        ):
            array = getattr(self, name)
            out = np.full(grown, fill, dtype=array.dtype)
            out[:old] = array
            setattr(self, name, out)

    def add(self, row: int, opts: worker_pb2.SamplingOptions) -> None:
        """Row's parameters become those of a new request's options."""
        self._grow(row + 1)
        self.release(row)
        self.params[:, row] = (
            opts.temperature,
            opts.top_p,
            opts.top_k,
            opts.min_p,
            opts.presence_penalty,
            opts.frequency_penalty,
            opts.repetition_penalty or 1.0,  # 0: unset
        )
        self.seeded[row] = opts.HasField("seed")
        self.seed[row] = opts.seed
        self.prompt_len[row] = opts.prompt_len
        self.min_tokens[row] = opts.min_tokens
        self.logprobs[row] = opts.logprobs if opts.HasField("logprobs") else -1
        if opts.min_tokens and opts.banned_until_min_tokens:
            self.banned[row] = np.array(opts.banned_until_min_tokens, dtype=np.int64)
        repetition = opts.repetition_penalty not in (0.0, 1.0)
        self.penalized[row] = bool(opts.presence_penalty or opts.frequency_penalty or repetition)
        self.plain_greedy[row] = (
            opts.temperature < GREEDY_EPS
            and self.logprobs[row] < 0
            and not self.penalized[row]
            and row not in self.banned
        )

    def release(self, row: int) -> None:
        self.banned.pop(row, None)
        self.penalized[row] = self.plain_greedy[row] = False
        if self.slot[row]:
            self.free_slots.append(int(self.slot[row]))
            self.slot[row] = 0

    def batch(
        self, rows: np.ndarray, held: RequestRows, vocab: int, device: torch.device
    ) -> SamplingBatch:
        """The SamplingBatch of a step's sampling rows [n] (in the order of its sampled tokens),
        on device; penalty counts and min_tokens bans only when some row needs them. held: the
        rows' tokens (each samples its output number num_tokens - prompt_len)."""
        params = self.params[:, rows]  # [7, n]
        on_device = to_device_async(torch.from_numpy(params), device)  # one copy, a row a parameter
        outputs = held.num_tokens[rows] - self.prompt_len[rows]  # [n] before this step's token
        seeds: list[int | None] = [None] * len(rows)
        for i in np.flatnonzero(self.seeded[rows]):
            seeds[i] = draw_seed(int(self.seed[rows[i]]), int(outputs[i]))
        batch = SamplingBatch(
            temperatures=on_device[TEMPERATURE],
            seeds=seeds,
            all_greedy=bool((params[TEMPERATURE] < GREEDY_EPS).all()),
        )
        if ((params[TOP_K] > 0) | (params[TOP_P] < 1)).any():
            batch.top_ps = on_device[TOP_P]
            batch.top_ks = on_device[TOP_K].long()
            batch.max_top_k = int(params[TOP_K].max())
        if (params[MIN_P] != 0).any():
            batch.min_ps = on_device[MIN_P]
        asked = self.logprobs[rows]
        if (asked >= 0).any():
            batch.num_logprobs = int(asked.max())
        banned = [  # flat indices batch row * vocab + token id of the rows short of min_tokens
            i * vocab + ids[ids < vocab]
            for i in np.flatnonzero(outputs < self.min_tokens[rows])
            if (ids := self.banned.get(int(rows[i]))) is not None
        ]
        if banned:
            flat_ids = to_device_async(torch.from_numpy(np.concatenate(banned)), device)
            batch.suppressed = token_mask(flat_ids, len(rows), vocab)
        penalized = self.penalized[rows]
        if penalized.any():
            self._fill(rows[penalized], held, vocab, device)
            slots = to_device_async(torch.from_numpy(self.slot[rows]), device)
            batch.penalties = Penalties(
                presence=on_device[PRESENCE],
                frequency=on_device[FREQUENCY],
                repetition=on_device[REPETITION],
                output_counts=self.counts[slots],
                prompt_mask=self.prompt_mask[slots],
            )
        return batch

    def profile_batch(self, num_rows: int, vocab: int, device: torch.device) -> SamplingBatch:
        """A batch of num_rows rows with every option on (top-p, min-p, penalties, bans,
        logprobs), its tensors of a step's sizes, and the penalty slots of num_rows penalized
        rows reserved: what sampling a full step can hold at once, for ProfileMemory. (One top
        logprob: the [rows, vocab] log-softmax is what logprobs cost, whatever their number.)"""
        self._reserve(num_rows, vocab, device)

        def rows_of(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.full((num_rows,), value, dtype=dtype, device=device)

        return SamplingBatch(
            temperatures=rows_of(0.8),
            seeds=[None] * num_rows,
            top_ps=rows_of(0.9),
            top_ks=rows_of(0, torch.int64),
            min_ps=rows_of(0.05),
            penalties=Penalties(
                presence=rows_of(0.5),
                frequency=rows_of(0.5),
                repetition=rows_of(1.1),
                output_counts=torch.zeros(num_rows, vocab, device=device),
                prompt_mask=torch.zeros(num_rows, vocab, dtype=torch.bool, device=device),
            ),
            suppressed=torch.zeros(num_rows, vocab, dtype=torch.bool, device=device),
            num_logprobs=1,
        )

    def count(self, rows: np.ndarray, sampled: torch.Tensor) -> None:
        """A step sampled sampled [n] (on the device) for rows [n]: its penalized rows' slots
        count their token, queued after the sampling on the device."""
        penalized = np.flatnonzero(self.penalized[rows])
        if not len(penalized):
            return
        vocab, device = self.counts.shape[1], sampled.device
        if len(penalized) < len(rows):
            sampled = sampled[to_device_async(torch.from_numpy(penalized), device)]
        starts = to_device_async(torch.from_numpy(self.slot[rows[penalized]] * vocab), device)
        flat = self.counts.view(-1)  # [slots * vocab]; scatter_add_: atomic adds, no sort
        flat.scatter_add_(0, starts + sampled, torch.ones(len(penalized), device=device))

    def _fill(self, rows: np.ndarray, held: RequestRows, vocab: int, device: torch.device) -> None:
        """Gives the penalized rows without a slot one, filled from their tokens on the host:
        the prompt's in prompt_mask, the outputs' (a resumed request's) in counts."""
        new = rows[self.slot[rows] == 0]
        if not len(new):
            return
        if (held.num_tokens[new] != held.num_known[new]).any():
            raise RuntimeError("a penalized request's first sampling step has a token in flight")
        self._reserve(len(new), vocab, device)
        slots = np.array([self.free_slots.pop() for _ in new], dtype=np.int64)
        self.slot[new] = slots
        slots_d = to_device_async(torch.from_numpy(slots), device)
        self.counts.index_fill_(0, slots_d, 0.0)  # a reused slot's rows emptied
        self.prompt_mask.index_fill_(0, slots_d, False)
        # Their tokens as flat indices slot * vocab + token id ([total tokens]), split into
        # the prompts' and the outputs'.
        histories = [held.history(int(row)) for row in new]
        lengths = np.array([len(h) for h in histories])
        flat_ids = np.repeat(slots * vocab, lengths) + np.concatenate(histories)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        in_prompt = np.arange(len(flat_ids)) - starts < np.repeat(self.prompt_len[new], lengths)
        prompt_ids = to_device_async(torch.from_numpy(flat_ids[in_prompt]), device)
        output_ids = to_device_async(torch.from_numpy(flat_ids[~in_prompt]), device)
        self.prompt_mask.view(-1).index_fill_(0, prompt_ids, True)
        ones = torch.ones(len(output_ids), device=device)
        self.counts.view(-1).scatter_add_(0, output_ids, ones)

    def _reserve(self, needed: int, vocab: int, device: torch.device) -> None:
        """At least `needed` free slots (the tensors doubled, slot 0 the empty one)."""
        if len(self.free_slots) >= needed:
            return
        old = 0 if self.counts is None else len(self.counts)
        size = max(2 * old, old + (old == 0) + needed - len(self.free_slots), 8)
        counts = torch.zeros(size, vocab, device=device)
        prompt_mask = torch.zeros(size, vocab, dtype=torch.bool, device=device)
        if old:
            counts[:old], prompt_mask[:old] = self.counts, self.prompt_mask
        self.counts, self.prompt_mask = counts, prompt_mask
        self.free_slots.extend(range(size - 1, max(old, 1) - 1, -1))


def token_mask(flat_ids: torch.Tensor, num_rows: int, vocab: int) -> torch.Tensor:
    """[num_rows, vocab] bool, True at flat_ids (row * vocab + token id, on the device), set by
    index_fill_ with a scalar. Not `mask[rows, ids] = True`: on CUDA, index_put_ first copies
    a Python scalar's CPU tensor to the device with a blocking copy, which synchronizes the
    stream (measured: every launch with a penalized row waited for the device)."""
    mask = torch.zeros(num_rows * vocab, dtype=torch.bool, device=flat_ids.device)
    return mask.index_fill_(0, flat_ids, True).view(num_rows, vocab)
