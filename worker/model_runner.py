"""Runs one StepPlan on this rank: keeps each request's tokens and block table, applies the
plan's block swaps and copies, builds the flat batch, runs the model over the paged KV cache and
samples.

A request samples a token when its computed tokens catch up with its total (the end of a
prefill, or every decode step); a partial prefill chunk only fills the cache.

The batch is built with numpy from per-request counters and the host block tables
(worker.block_table), never from lists of every token. On CUDA a step of decodes alone replays
a captured graph (worker.cuda_graph); prefill and mixed steps run eagerly.

A step is launched, then finished: launch() queues the device work and the copy of the sampled
tokens to the host; finish() waits for them and appends them. The worker launches step N+1
before it finishes step N whenever plan N+1 has already arrived, so the device never waits for
the host between them:

    host    launch N | finish N-1 | launch N+1 | finish N | launch N+2 | ...
    device  ...  N-1 ....|........ N ..........|........ N+1 .........

A request decoding in N+1 whose token from N has not reached the host yet reads it from N's
sampled tokens on the device (its `pending_index`). Rows with penalties need their whole
history on the host: a plan that has such a row with a token in flight finishes first.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels import copy_blocks
from protos import worker_pb2
from protos.step_plan import cached_requests
from worker import distributed
from worker.block_table import BlockTables
from worker.cuda_graph import DecodeGraphs
from worker.layers.attention import AttentionMetadata
from worker.sampler import (
    GREEDY_EPS,
    Penalties,
    SampleOutput,
    SamplingBatch,
    draw_seed,
    sample,
)


@dataclass
class RequestState:
    """What this rank holds of one request. token_ids grows by the tokens rank 0 samples; its
    block table is row `row` of the runner's BlockTables."""

    token_ids: list[int]
    row: int
    num_computed_tokens: int
    sampling: worker_pb2.SamplingOptions
    num_pending: int = 0  # tokens sampled by launched steps, not yet in token_ids (0, 1 or 2)
    pending_index: int = -1  # its row in the newest launched step's sampled tokens, if pending
    # Greedy with nothing else asked (no logprobs, penalties or min_tokens bans): its token is
    # the LM head's greedy argmax, which needs no gathered logits and no sampler.
    plain_greedy: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.sampling.prompt_len

    @property
    def penalized(self) -> bool:
        s = self.sampling
        return bool(
            s.presence_penalty or s.frequency_penalty or s.repetition_penalty not in (0.0, 1.0)
        )


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled tokens are on their way to the host."""

    result: worker_pb2.StepResult  # everything but the tokens and logprobs
    samplers: list[tuple[str, RequestState]] = field(default_factory=list)
    tokens: torch.Tensor | None = None  # [num_samplers] int64 on the host once `done` fired
    done: torch.cuda.Event | None = None  # None on the CPU: already done
    out: SampleOutput | None = None  # rank 0's logprobs, when asked


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = 0
        self.requests: dict[str, RequestState] = {}
        self.block_tables = BlockTables(max_blocks=0)
        self.graphs: DecodeGraphs | None = None
        self._last_done = time.perf_counter()  # the newest finished step's tokens reached the host
        self._launched: LaunchedStep | None = None  # the newest launched step
        self._sampled: torch.Tensor | None = None  # its sampled tokens, on the device
        self.shared_generator = torch.Generator(device=device).manual_seed(seed)
        # Swap space: per layer K and V in host memory (pinned for CUDA), like the device cache.
        self.cpu_key_caches: list[torch.Tensor] = []
        self.cpu_value_caches: list[torch.Tensor] = []

    def bytes_per_block(self, block_size: int) -> int:
        num_layers, kv_heads, head_dim = self.model.kv_cache_spec()
        per_token = 2 * num_layers * kv_heads * head_dim
        return per_token * block_size * torch.tensor([], dtype=self.dtype).element_size()

    def init_cache(
        self,
        num_blocks: int,
        block_size: int,
        num_cpu_blocks: int = 0,
        max_num_seqs: int = 0,
        max_model_len: int = 0,
        enforce_eager: bool = True,
    ) -> None:
        """Allocates per layer K and V: [num_blocks, block_size, num_kv_heads_local, head_dim],
        and the same with num_cpu_blocks in host memory for swapped-out requests. On CUDA,
        unless enforce_eager, then captures the decode graphs for up to max_num_seqs requests.

        A request holds at most ceil(max_model_len / block_size) blocks (num_blocks if 0)."""
        _, kv_heads, head_dim = self.model.kv_cache_spec()
        shape = (num_blocks, block_size, kv_heads, head_dim)
        cpu_shape = (num_cpu_blocks, block_size, kv_heads, head_dim)
        pin = self.device.type == "cuda"
        self.cpu_key_caches, self.cpu_value_caches = [], []
        for attn in self.model.attention_layers():
            attn.key_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.value_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            if num_cpu_blocks:
                self.cpu_key_caches.append(torch.zeros(cpu_shape, dtype=self.dtype, pin_memory=pin))
                self.cpu_value_caches.append(
                    torch.zeros(cpu_shape, dtype=self.dtype, pin_memory=pin)
                )
        self.block_size = block_size
        self.requests.clear()
        max_blocks = -(-max_model_len // block_size) if max_model_len else num_blocks
        self.block_tables = BlockTables(max(max_blocks, 1))
        self.graphs = None
        if self.device.type == "cuda" and not enforce_eager and max_num_seqs and num_blocks:
            self.graphs = DecodeGraphs(self.model, max_num_seqs, max(max_blocks, 1), self.device)
            self.graphs.capture()

    def _device_caches(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        layers = self.model.attention_layers()
        return [a.key_cache for a in layers], [a.value_cache for a in layers]

    def _device_and_host_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device cache, host cache) of every layer's K, then of every layer's V."""
        keys, values = self._device_caches()
        host = [*self.cpu_key_caches, *self.cpu_value_caches]
        return list(zip([*keys, *values], host, strict=True))

    def _swap_out(self, pairs: list[worker_pb2.BlockCopy]) -> None:
        """Device block src -> host block dst, every layer's K and V."""
        src = torch.tensor([p.src for p in pairs], dtype=torch.int64, device=self.device)
        dst = torch.tensor([p.dst for p in pairs], dtype=torch.int64)
        for device_cache, host_cache in self._device_and_host_caches():
            host_cache[dst] = device_cache[src].cpu()

    def _swap_in(self, pairs: list[worker_pb2.BlockCopy]) -> None:
        """Host block src -> device block dst, every layer's K and V."""
        src = torch.tensor([p.src for p in pairs], dtype=torch.int64)
        dst = torch.tensor([p.dst for p in pairs], dtype=torch.int64, device=self.device)
        for device_cache, host_cache in self._device_and_host_caches():
            device_cache[dst] = host_cache[src].to(self.device, non_blocking=True)

    def _copy_blocks(self, pairs: list[worker_pb2.BlockCopy]) -> None:
        """Device block src -> device block dst (copy-on-write), every layer's K and V."""
        mapping = torch.tensor([(p.src, p.dst) for p in pairs], dtype=torch.int64)
        copy_blocks(*self._device_caches(), mapping.to(self.device))

    def execute(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        """Applies the plan's diff, runs the step; returns the ids and tokens it sampled (and
        their logprobs, on rank 0, when asked) as a StepResult without step_id."""
        return self.finish(self.launch(plan))

    def needs_host_tokens(self, plan: worker_pb2.StepPlan) -> bool:
        """Whether a request of the plan samples with penalties while a token of it is still on
        its way to the host: then the launched step must finish before this plan launches."""
        for rid in plan.cached_requests.request_ids:
            state = self.requests.get(rid)
            if state is not None and state.num_pending and state.penalized:
                return True
        return False

    @torch.inference_mode()
    def launch(self, plan: worker_pb2.StepPlan) -> LaunchedStep:
        """Applies the plan's diff and queues the step on the device (see the module doc)."""
        tables = self.block_tables
        for rid in (*plan.finished_request_ids, *plan.preempted_request_ids):
            state = self.requests.pop(rid, None)
            if state is not None:
                tables.release(state.row)
        for rid in plan.swapped_request_ids:  # its blocks moved to host memory
            tables.replace(self.requests[rid].row, [])
        # Before the forward pass, in this order (see scheduler/core/page_table.py for why).
        if plan.swap_out:
            self._swap_out(plan.swap_out)
        if plan.swap_in:
            self._swap_in(plan.swap_in)
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        scheduled: list[tuple[str, RequestState, int]] = []
        for new in plan.new_requests:
            if (old := self.requests.get(new.request_id)) is not None:
                tables.release(old.row)
            state = self._new_state(new)
            self.requests[new.request_id] = state
            scheduled.append((new.request_id, state, new.num_scheduled_tokens))
        for rid, num_computed, n, blocks, replace in cached_requests(plan):
            state = self.requests[rid]
            if state.num_computed_tokens != num_computed:
                raise RuntimeError(
                    f"request {rid}: worker computed {state.num_computed_tokens} "
                    f"tokens, plan says {num_computed}"
                )
            if replace:
                tables.replace(state.row, blocks)
            elif blocks:
                tables.append(state.row, blocks)
            scheduled.append((rid, state, n))
        if not scheduled:
            return LaunchedStep(worker_pb2.StepResult())
        return self._run(scheduled)

    @staticmethod
    def wait(step: LaunchedStep) -> None:
        """Blocks until a launched step's tokens are on the host (releases the GIL meanwhile)."""
        if step.done is not None:
            step.done.synchronize()

    def finish(self, step: LaunchedStep) -> worker_pb2.StepResult:
        """Waits for a launched step's tokens and appends them; returns its StepResult."""
        if not step.samplers:
            return step.result
        self.wait(step)
        tokens = step.tokens.tolist()
        for (_, state), token in zip(step.samplers, tokens, strict=True):
            state.token_ids.append(token)
            state.num_pending -= 1
        self._last_done = time.perf_counter()
        result = step.result
        result.request_ids.extend(rid for rid, _ in step.samplers)
        result.token_ids.extend(tokens)
        if step.out is not None and step.out.sampled_logprobs is not None:
            _add_logprobs(result, [s.sampling for _, s in step.samplers], step.out)
        return result

    def _new_state(self, new: worker_pb2.NewRequest) -> RequestState:
        opts = new.sampling
        state = RequestState(
            token_ids=list(new.token_ids),
            row=self.block_tables.add(list(new.block_ids)),
            num_computed_tokens=new.num_computed_tokens,
            sampling=opts,
        )
        state.plain_greedy = (
            opts.temperature < GREEDY_EPS
            and not opts.HasField("logprobs")
            and not state.penalized
            and not (opts.min_tokens and opts.banned_until_min_tokens)
        )
        return state

    def _sampling_batch(self, states: list[RequestState], vocab: int, tensor) -> SamplingBatch:
        """Per-row parameters; penalty and min_tokens tensors only when some row needs them."""
        opts = [s.sampling for s in states]
        batch = SamplingBatch(
            temperatures=tensor([o.temperature for o in opts], torch.float32),
            # Each row samples its next output token: the one at index num_output_tokens (the
            # prompt_len of a recomputed request's NewRequest keeps its outputs apart).
            seeds=[
                draw_seed(o.seed, s.num_output_tokens) if o.HasField("seed") else None
                for o, s in zip(opts, states, strict=True)
            ],
            all_greedy=all(o.temperature < GREEDY_EPS for o in opts),
        )
        if any(o.top_k > 0 or o.top_p < 1 for o in opts):
            batch.top_ps = tensor([o.top_p for o in opts], torch.float32)
            batch.top_ks = tensor([o.top_k for o in opts], torch.int64)
        asked = [o.logprobs for o in opts if o.HasField("logprobs")]
        if asked:
            batch.num_logprobs = max(asked)
        if any(o.min_p for o in opts):
            batch.min_ps = tensor([o.min_p for o in opts], torch.float32)
        banned = [
            (row, list(s.sampling.banned_until_min_tokens))
            for row, s in enumerate(states)
            if s.num_output_tokens < s.sampling.min_tokens
        ]
        if banned:
            suppressed = torch.zeros(len(states), vocab, dtype=torch.bool)
            for row, ids in banned:
                suppressed[row, [i for i in ids if i < vocab]] = True
            batch.suppressed = suppressed.to(self.device)
        if any(s.penalized for s in states):
            counts = torch.zeros(len(states), vocab)
            prompt_mask = torch.zeros(len(states), vocab, dtype=torch.bool)
            for row, s in enumerate(states):
                prompt_len = s.sampling.prompt_len
                output = torch.tensor(s.token_ids[prompt_len:], dtype=torch.int64)
                counts[row].index_add_(0, output, torch.ones(len(output)))
                prompt_mask[row, torch.tensor(s.token_ids[:prompt_len], dtype=torch.int64)] = True
            batch.penalties = Penalties(
                presence=tensor([o.presence_penalty for o in opts], torch.float32),
                frequency=tensor([o.frequency_penalty for o in opts], torch.float32),
                repetition=tensor([o.repetition_penalty or 1.0 for o in opts], torch.float32),
                output_counts=counts.to(self.device),
                prompt_mask=prompt_mask.to(self.device),
            )
        return batch

    def _run(self, scheduled: list[tuple[str, RequestState, int]]) -> LaunchedStep:
        bs, tables = self.block_size, self.block_tables
        num_seqs = len(scheduled)
        rows = np.empty(num_seqs, dtype=np.int64)
        starts = np.empty(num_seqs, dtype=np.int64)  # computed tokens before this step
        counts = np.empty(num_seqs, dtype=np.int64)  # tokens computed in this step
        input_ids: list[int] = []
        # Per input token: its row in the newest launched step's sampled tokens (still on the
        # device), or -1 when input_ids holds it.
        from_device: list[int] = []
        samplers: list[tuple[str, RequestState]] = []
        sample_seqs: list[int] = []  # which sequence each sampling request is
        for i, (rid, state, n) in enumerate(scheduled):
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            if end > state.num_tokens or end > tables.num_blocks(state.row) * bs:
                raise RuntimeError(f"request {rid}: {n} tokens scheduled past its tokens or blocks")
            rows[i], starts[i], counts[i] = state.row, start, n
            known = state.token_ids[start:end]
            input_ids.extend(known)
            from_device.extend([-1] * len(known))
            if len(known) < n:  # its newest token is in flight: at most one, the last input
                input_ids.append(0)
                from_device.append(state.pending_index)
            if end == state.num_tokens:
                samplers.append((rid, state))
                sample_seqs.append(i)
        ends = starts + counts  # [num_seqs] each sequence's context after this step
        width = int(-(-ends.max() // bs))
        max_query_len = int(counts.max())
        graph_size = None
        if self.graphs is not None and max_query_len == 1:
            graph_size = self.graphs.size_for(num_seqs)
        result = worker_pb2.StepResult(cuda_graph=graph_size is not None, idle_ms=self._idle_ms())
        ids = np.asarray(input_ids, dtype=np.int64)
        sources = np.asarray(from_device, dtype=np.int64)
        greedy = None  # the samplers' greedy tokens, in place where the next graph reads them
        if graph_size is not None:
            # Decodes alone: one token per sequence, at position starts[i].
            slots = tables.table[rows, starts // bs] * bs + starts % bs
            local, greedy = self.graphs.run(
                graph_size, ids, sources, starts, slots, tables.table[rows, :width]
            )
            if len(samplers) < num_seqs:  # a one-token prefill chunk that does not sample
                local = local[torch.from_numpy(np.asarray(sample_seqs)).to(self.device)]
                greedy = None  # the graph's are in sequence order, not the samplers
        elif samplers:
            hidden = self._run_eager(ids, sources, rows, starts, counts, width, max_query_len)
            sample_rows = np.cumsum(counts)[sample_seqs] - 1
            if len(sample_rows) < hidden.shape[0]:
                hidden = hidden[torch.from_numpy(sample_rows).to(self.device, non_blocking=True)]
            local = self.model.lm_head.local_logits(hidden)
        else:
            self._run_eager(ids, sources, rows, starts, counts, width, max_query_len)
        for _, state, n in scheduled:
            state.num_computed_tokens += n
        step = LaunchedStep(result, samplers)
        if samplers:
            self._sample(local, greedy, step)
        self._launched = step
        return step

    def _idle_ms(self) -> float:
        """Host time before this launch during which the device had nothing queued: 0 when
        the newest launched step is still running, else the time since its tokens arrived."""
        last = self._launched
        if last is not None and last.done is not None and not last.done.query():
            return 0.0
        return (time.perf_counter() - self._last_done) * 1e3

    def _input_ids(self, ids: np.ndarray, sources: np.ndarray) -> torch.Tensor:
        """The step's input ids on the device: ids, except where sources >= 0 names a token of
        the newest launched step's sampled tokens."""
        device_ids = torch.from_numpy(ids).to(self.device, non_blocking=True)
        if (sources < 0).all():
            return device_ids
        src = torch.from_numpy(sources).to(self.device, non_blocking=True)
        return torch.where(src >= 0, self._sampled[src.clamp(min=0)], device_ids)

    def _run_eager(
        self,
        ids: np.ndarray,
        sources: np.ndarray,
        rows: np.ndarray,
        starts: np.ndarray,
        counts: np.ndarray,
        width: int,
        max_query_len: int,
    ) -> torch.Tensor:
        """The forward pass over any batch: [num_tokens] flat, sequence i's tokens are rows
        query_start_loc[i]:query_start_loc[i + 1]."""
        bs = self.block_size
        query_start_loc = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start_loc[1:])
        # Token t of sequence i sits at position starts[i] + (t - query_start_loc[i]).
        token_seq = np.repeat(np.arange(len(counts)), counts)  # [num_tokens]
        positions = np.arange(query_start_loc[-1]) - query_start_loc[token_seq] + starts[token_seq]
        table = self.block_tables.table
        slots = table[rows[token_seq], positions // bs] * bs + positions % bs

        def tensor(data: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.from_numpy(data).to(device=self.device, dtype=dtype, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(table[rows, :width], torch.int32),
            seq_lens=tensor(starts + counts, torch.int32),
            query_start_loc=tensor(query_start_loc, torch.int32),
            max_query_len=max_query_len,
            max_seq_len=int((starts + counts).max()),
        )
        return self.model(self._input_ids(ids, sources), tensor(positions, torch.int64), meta)

    def _sample(self, local: torch.Tensor, greedy: torch.Tensor | None, step: LaunchedStep) -> None:
        """Picks each sampling request's token from this rank's logits of its last row
        (local [num_samplers, vocab_shard]; greedy: their greedy tokens, when a graph left
        them): the greedy argmax on every rank when every row is plain greedy, else rank 0
        gathers the logits, samples and broadcasts. Every rank keeps the tokens on the device
        for the next step's inputs and starts their copy to the host (finish() appends them)."""
        lm_head = self.model.lm_head
        states = [state for _, state in step.samplers]
        if all(state.plain_greedy for state in states):
            sampled = greedy if greedy is not None else lm_head.greedy(local)
        else:
            logits = lm_head.gather_logits(local)
            if logits is None:
                sampled = torch.empty(len(states), dtype=torch.int64, device=self.device)
            else:

                def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
                    return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

                batch = self._sampling_batch(states, logits.shape[-1], tensor)
                step.out = sample(logits, batch, self.shared_generator)
                sampled = step.out.token_ids
            sampled = distributed.broadcast_from_rank0(sampled)
        self._sampled = sampled
        if self.graphs is not None and sampled is not greedy:
            self.graphs.sampled[: len(states)].copy_(sampled)
        for index, state in enumerate(states):
            state.num_pending += 1
            state.pending_index = index
        if self.device.type == "cuda":
            step.tokens = torch.empty(len(states), dtype=torch.int64, pin_memory=True)
            step.tokens.copy_(sampled, non_blocking=True)
            step.done = torch.cuda.Event()
            step.done.record()
        else:
            step.tokens = sampled


def _add_logprobs(
    result: worker_pb2.StepResult, opts: list[worker_pb2.SamplingOptions], out: SampleOutput
) -> None:
    """Packs each row's logprobs: its sampled token's, then as many top ones as it asked."""
    result.sampled_logprobs.extend(out.sampled_logprobs.tolist())
    result.sampled_ranks.extend(out.sampled_ranks.tolist())
    top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
    for row, o in enumerate(opts):
        k = o.logprobs if o.HasField("logprobs") else -1  # -1: this row asked for none
        result.num_top_logprobs.append(k)
        result.top_token_ids.extend(top_ids[row][: max(k, 0)])
        result.top_logprobs.extend(top_logprobs[row][: max(k, 0)])
