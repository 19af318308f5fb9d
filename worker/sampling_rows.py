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

A step's batch:  params[:, rows] -> one host-to-device copy -> a view a parameter
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
        ):
            array = getattr(self, name)
            out = np.full(grown, fill, dtype=array.dtype)
            out[:old] = array
            setattr(self, name, out)

    def add(self, row: int, opts: worker_pb2.SamplingOptions) -> None:
        """Row's parameters become those of a new request's options."""
        self._grow(row + 1)
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
        self.banned.pop(row, None)
        if opts.min_tokens and opts.banned_until_min_tokens:
            self.banned[row] = np.array(opts.banned_until_min_tokens, dtype=np.int64)

    def release(self, row: int) -> None:
        self.banned.pop(row, None)

    def batch(
        self,
        rows: np.ndarray,
        held: RequestRows,
        vocab: int,
        in_flight: torch.Tensor | None,
        device: torch.device,
    ) -> SamplingBatch:
        """The SamplingBatch of a step's sampling rows [n] (in the order of its sampled tokens),
        on device; penalty counts and min_tokens bans only when some row needs them. held: the
        rows' tokens (each samples its output number num_tokens - prompt_len); in_flight: the
        step before's sampled tokens on the device, where a penalized row's newest output may
        still be (RequestRows.pending_index)."""
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
        penalized = np.flatnonzero(held.penalized[rows])
        if len(penalized):
            batch.penalties = Penalties(
                presence=on_device[PRESENCE],
                frequency=on_device[FREQUENCY],
                repetition=on_device[REPETITION],
                **self._counts(rows, penalized, held, vocab, in_flight, device),
            )
        return batch

    def _counts(
        self,
        rows: np.ndarray,
        penalized: np.ndarray,
        held: RequestRows,
        vocab: int,
        in_flight: torch.Tensor | None,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """output_counts [n, vocab] float32 and prompt_mask [n, vocab] bool, built on the
        device from the tokens of the batch rows `penalized` (the others' stay empty: their
        penalties are off)."""
        n = len(rows)
        # Their tokens on the host, prompt then outputs, as flat indices batch row * vocab +
        # token id ([total tokens]), split into the prompts' and the outputs'.
        histories = [held.history(int(rows[i])) for i in penalized]
        lengths = np.array([len(h) for h in histories])
        flat_ids = np.repeat(penalized * vocab, lengths) + np.concatenate(histories)
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        prompt_lens = np.repeat(self.prompt_len[rows[penalized]], lengths)
        in_prompt = np.arange(len(flat_ids)) - starts < prompt_lens
        prompt_ids = to_device_async(torch.from_numpy(flat_ids[in_prompt]), device)
        output_ids = to_device_async(torch.from_numpy(flat_ids[~in_prompt]), device)
        # Counted by scatter_add_ into the flat [n * vocab] view (atomic adds, no sort).
        counts = torch.zeros(n, vocab, device=device)
        flat = counts.view(-1)
        flat.scatter_add_(0, output_ids, torch.ones(len(output_ids), device=device))
        # A penalized row's newest output may still be on its way to the host (the step
        # before this one is in flight): read where that step's sampling left it, on the
        # device (its own tensor: a step with a penalized row never samples in a graph's).
        in_flight_counts = held.num_tokens[rows] - held.num_known[rows]
        if in_flight_counts.max() > 1:
            raise RuntimeError("a request has two sampled tokens not yet on the host")
        waiting = penalized[in_flight_counts[penalized] > 0]
        if len(waiting):
            pending = to_device_async(torch.from_numpy(held.pending_index[rows[waiting]]), device)
            waiting_rows = to_device_async(torch.from_numpy(waiting), device)
            ones = torch.ones(len(waiting), device=device)
            flat.scatter_add_(0, waiting_rows * vocab + in_flight[pending], ones)
        return {"output_counts": counts, "prompt_mask": token_mask(prompt_ids, n, vocab)}


def token_mask(flat_ids: torch.Tensor, num_rows: int, vocab: int) -> torch.Tensor:
    """[num_rows, vocab] bool, True at flat_ids (row * vocab + token id, on the device), set by
    index_fill_ with a scalar. Not `mask[rows, ids] = True`: on CUDA, index_put_ first copies
    a Python scalar's CPU tensor to the device with a blocking copy, which synchronizes the
    stream (measured: every launch with a penalized row waited for the device)."""
    mask = torch.zeros(num_rows * vocab, dtype=torch.bool, device=flat_ids.device)
    return mask.index_fill_(0, flat_ids, True).view(num_rows, vocab)
