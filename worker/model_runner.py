"""Runs one StepPlan on this rank: keeps each request's tokens and block table, applies the
plan's block swaps and copies, builds the flat batch, runs the model over the paged KV cache and
samples.

A request samples a token when its computed tokens catch up with its total (the end of a
prefill, or every decode step); a partial prefill chunk only fills the cache.

Each request held is one row of host arrays: its tokens and counters (worker.request_rows)
and its block table (worker.block_table), the same row in both. A plan's diff is applied to
them in place and the batch gathered from them with numpy, with no Python loop over the
scheduled requests but the one mapping their ids to rows; the sampled tokens are appended
with one scatter. On CUDA a step replays a captured graph (worker.cuda_graph), its inputs
moved in one copy, when it fits one row a token: decodes, and prefill chunks short enough
(GRAPH_PREFILL_PAIRS) that attending each of their tokens to its prefix with the decode kernel
costs less than launching the step eagerly. Other steps of up to PIECEWISE_MAX_TOKENS tokens
replay the forward pass in pieces (worker.piecewise_graph), only their attention launched
eagerly; larger ones run eagerly.

A step is launched, then finished: launch() queues the device work and the copy of the sampled
tokens to the host; finish() waits for them and appends them. The worker launches step N+1
before it finishes step N whenever plan N+1 has already arrived, so the device never waits for
the host between them:

    host    launch N | finish N-1 | launch N+1 | finish N | launch N+2 | ...
    device  ...  N-1 ....|........ N ..........|........ N+1 .........

A request decoding in N+1 whose token from N has not reached the host yet reads it from N's
sampled tokens on the device (its row's `pending_index`). A row given to another request
before N's tokens arrive takes none of them (its `epoch` changed). A row with penalties counts
that token the same way: its history on the host, and the one in flight from N's sampled
tokens on the device.
"""

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from kernels import copy_blocks
from protos import worker_pb2
from protos.step_plan import cached_arrays
from worker import distributed
from worker.block_table import BlockTables
from worker.cuda_graph import DecodeGraphs
from worker.layers.attention import AttentionMetadata
from worker.layers.linear import choose_one_row
from worker.piecewise_graph import PiecewiseGraphs
from worker.request_rows import RequestRows
from worker.sampler import SampleOutput, sample
from worker.sampling_rows import SamplingRows
from worker.step_staging import StepStaging, to_device_async

# ModelRunner.warm_up's prefill lengths: with every longer one the prefill kernel's tile height
# (kernels.triton_prefill_attention.prefill_config: the longest query's next power of two,
# between 16 rows / the GQA group and 128 rows) takes each value it can.
WARM_UP_QUERY_LENS = (2, 4, 8, 16, 32, 64, 128)
# A step's prefill chunks replay a decode graph, one row a token, while the (token, context)
# pairs their attention reads stay within this: the decode kernel reads a token's whole prefix
# for each token of a chunk, where the prefill kernel reads it once a tile of queries. One
# 64-token prompt from the start: 64 x 64 pairs. Past it the piecewise graphs are as fast or
# faster (BENCHMARKS.md "Mixed steps in the pieces").
GRAPH_PREFILL_PAIRS = 1 << 12
# The graphs hold this many rows beyond max_num_seqs, so that a step at full concurrency still
# replays one with short prompts' tokens beside its decodes (two 128-token prompts).
GRAPH_PROMPT_ROWS = 256
# The piecewise graphs' largest token count (or max_num_batched_tokens, when smaller). An eager
# step's host time (some ten launches a layer from Python) matters less beyond it.
PIECEWISE_MAX_TOKENS = 2048

log = logging.getLogger(__name__)


@dataclass
class RequestState:
    """What this rank holds of one request: its row of RequestRows (tokens, counters),
    SamplingRows (how it samples) and BlockTables."""

    row: int


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled tokens are on their way to the host."""

    result: worker_pb2.StepResult  # everything but the tokens and logprobs
    request_ids: list[str] = field(default_factory=list)  # the sampling requests, in order
    rows: np.ndarray | None = None  # [num_samplers] their rows in RequestRows
    epochs: np.ndarray | None = None  # [num_samplers] those rows' epochs at the launch
    tokens: torch.Tensor | None = None  # [num_samplers] int64 on the host once `done` fired
    # CUDA only (None on the CPU, where a launched step is already done), both timing events
    # on the step's stream: `start` before its first device work, `done` after its last.
    start: torch.cuda.Event | None = None
    done: torch.cuda.Event | None = None
    out: SampleOutput | None = None  # rank 0's logprobs, when asked
    logprobs_asked: np.ndarray | None = None  # [num_samplers] each row's top k, -1 none


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
        self.rows = RequestRows()
        self.sampling = SamplingRows()
        self.staging = StepStaging(device)  # the eager steps' inputs, one copy a step
        self.graphs: DecodeGraphs | None = None
        self.pieces: PiecewiseGraphs | None = None
        self._last_done = time.perf_counter()  # CPU: the newest finished step's tokens arrived
        self._done_before: torch.cuda.Event | None = None  # CUDA: the newest finished step's end
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
        max_num_batched_tokens: int = 0,
    ) -> None:
        """Allocates per layer K and V: [num_blocks, block_size, num_kv_heads_local, head_dim],
        and the same with num_cpu_blocks in host memory for swapped-out requests. On CUDA,
        unless enforce_eager, then captures the graphs for up to max_num_seqs + GRAPH_PROMPT_ROWS
        rows, and the piecewise ones for up to min(max_num_batched_tokens, PIECEWISE_MAX_TOKENS)
        tokens (none when 0).

        A request holds at most ceil(max_model_len / block_size) blocks (num_blocks if 0).
        First, on CUDA, each linear layer picks its batch-1 kernel (choose_one_row: timed on
        its weights while the memory the caches take is still free)."""
        if self.device.type == "cuda":
            chosen = choose_one_row(self.model)
            log.info("batch-1 linear layers through the Triton GEMV: %d", chosen)
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
        self.rows = RequestRows()
        self.sampling = SamplingRows()
        self.graphs, self.pieces = None, None
        if self.device.type == "cuda" and not enforce_eager and max_num_seqs and num_blocks:
            began = time.perf_counter()
            rows = max_num_seqs + GRAPH_PROMPT_ROWS
            self.graphs = DecodeGraphs(self.model, rows, max(max_blocks, 1), self.device)
            self.graphs.capture()
            log.info(
                "CUDA graphs of %d row counts up to %d captured in %.1f s",
                len(self.graphs.sizes), rows, time.perf_counter() - began,
            )  # fmt: skip
            tokens = min(max_num_batched_tokens, PIECEWISE_MAX_TOKENS)
            if tokens > 0:
                began = time.perf_counter()
                self.pieces = PiecewiseGraphs(self.model, tokens, self.device)
                self.pieces.capture()
                log.info(
                    "piecewise CUDA graphs of %d token counts up to %d captured in %.1f s",
                    len(self.pieces.sizes), tokens, time.perf_counter() - began,
                )  # fmt: skip

    def warm_up(self) -> int:
        """Prefills of WARM_UP_QUERY_LENS tokens, one request each (those that fit the cache
        and the model's positions), so that every tile height the prefill kernel picks by a
        step's longest query is compiled now rather than by the first step that needs it (a
        compile stalls every request of the replica for about a second); then forgets them.
        Their KV entries stay in the cache's first blocks, free: a request writes a slot before
        it reads it. On CUDA also the kernel's two launches of a mixed step (_warm_up_split).
        Needs init_cache. Returns the prefills run."""
        bs = self.block_size
        num_blocks = len(self.model.attention_layers()[0].key_cache)
        lengths = [
            n
            for n in WARM_UP_QUERY_LENS
            if -(-n // bs) <= min(num_blocks, self.block_tables.max_blocks)
            and n <= self.model.max_positions
        ]
        previous: list[str] = []
        graphs, self.graphs = self.graphs, None  # eager: what compiles is the prefill kernel
        for n in lengths:
            request_id = f"warm-up-{n}"
            plan = worker_pb2.StepPlan(finished_request_ids=previous)
            plan.new_requests.append(
                worker_pb2.NewRequest(
                    request_id=request_id,
                    token_ids=[0] * n,
                    sampling=worker_pb2.SamplingOptions(temperature=0.0, top_p=1.0),
                    block_ids=list(range(-(-n // bs))),
                    num_scheduled_tokens=n,
                )
            )
            self.execute(plan)
            previous = [request_id]
        if self.device.type == "cuda":
            self._warm_up_split(lengths)
        self.graphs = graphs
        self.requests.clear()
        self.block_tables = BlockTables(self.block_tables.max_blocks)
        self.rows = RequestRows()
        self.sampling = SamplingRows()
        self._sampled, self._done_before = None, None
        self._last_done = time.perf_counter()
        return len(lengths)

    def _warm_up_split(self, lengths: list[int]) -> torch.Tensor:
        """The prefill kernel's launches of a step whose decodes take a launch of their own
        (SPLIT_CONTEXT passed), beside a prompt of each warm-up length: the first layer's
        attention over a one-token sequence and an n-token one, on blocks the warm-up wrote,
        its block table as wide as an eager step's (the kernel's compiled variant is the same).
        Returns the last attention's output [n + 1, num_heads, head_dim]."""
        from kernels.triton_prefill_attention import SPLIT_CONTEXT

        layer, bs = self.model.attention_layers()[0], self.block_size
        for n in lengths:
            blocks = -(-n // bs)
            tables = torch.zeros(
                2, self.block_tables.step_width(n, bs), dtype=torch.int32, device=self.device
            )
            tables[1, :blocks] = torch.arange(blocks, dtype=torch.int32, device=self.device)
            meta = AttentionMetadata(
                slot_mapping=torch.empty(0, dtype=torch.int64, device=self.device),  # not read
                block_tables=tables,
                seq_lens=torch.tensor([1, n], dtype=torch.int32, device=self.device),
                query_start_loc=torch.tensor([0, 1, n + 1], dtype=torch.int32, device=self.device),
                max_query_len=n,
                max_seq_len=n,
                one_token_context=SPLIT_CONTEXT + 1,
            )
            q = torch.zeros(
                n + 1, layer.num_heads, layer.head_dim, dtype=self.dtype, device=self.device
            )
            out = layer.attend(q, meta)
        return out

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
        src = to_device_async(torch.tensor([p.src for p in pairs], dtype=torch.int64), self.device)
        dst = torch.tensor([p.dst for p in pairs], dtype=torch.int64)
        for device_cache, host_cache in self._device_and_host_caches():
            host_cache[dst] = device_cache[src].cpu()

    def _swap_in(self, pairs: list[worker_pb2.BlockCopy]) -> None:
        """Host block src -> device block dst, every layer's K and V."""
        src = torch.tensor([p.src for p in pairs], dtype=torch.int64)
        dst = to_device_async(torch.tensor([p.dst for p in pairs], dtype=torch.int64), self.device)
        for device_cache, host_cache in self._device_and_host_caches():
            device_cache[dst] = to_device_async(host_cache[src], self.device)

    def _copy_blocks(self, pairs: list[worker_pb2.BlockCopy]) -> None:
        """Device block src -> device block dst (copy-on-write), every layer's K and V."""
        mapping = torch.tensor([(p.src, p.dst) for p in pairs], dtype=torch.int64)
        copy_blocks(*self._device_caches(), to_device_async(mapping, self.device))

    def execute(self, plan: worker_pb2.StepPlan) -> worker_pb2.StepResult:
        """Applies the plan's diff, runs the step; returns the ids and tokens it sampled (and
        their logprobs, on rank 0, when asked) as a StepResult without step_id."""
        return self.finish(self.launch(plan))

    def _release(self, row: int) -> None:
        self.block_tables.release(row)
        self.sampling.release(row)

    @torch.inference_mode()
    def launch(self, plan: worker_pb2.StepPlan) -> LaunchedStep:
        """Applies the plan's diff and queues the step on the device (see the module doc)."""
        start = None
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()  # before the swaps and copies: they are this step's device work
        step = self._launch(plan)
        step.start = start
        return step

    def _launch(self, plan: worker_pb2.StepPlan) -> LaunchedStep:
        tables = self.block_tables
        for rid in (*plan.finished_request_ids, *plan.preempted_request_ids):
            state = self.requests.pop(rid, None)
            if state is not None:
                self._release(state.row)
        for rid in plan.swapped_request_ids:  # its blocks moved to host memory
            tables.replace(self.requests[rid].row, [])
        # Before the forward pass, in this order (see scheduler/core/page_table.py for why).
        if plan.swap_out:
            self._swap_out(plan.swap_out)
        if plan.swap_in:
            self._swap_in(plan.swap_in)
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        # The scheduled requests in plan order: the new ones, then the cached ones.
        request_ids: list[str] = []
        new_rows: list[int] = []
        new_counts: list[int] = []
        for new in plan.new_requests:
            if (old := self.requests.get(new.request_id)) is not None:
                self._release(old.row)
            state = self._new_state(new)
            self.requests[new.request_id] = state
            request_ids.append(new.request_id)
            new_rows.append(state.row)
            new_counts.append(new.num_scheduled_tokens)
        cached = cached_arrays(plan)
        cached_rows = np.array([self.requests[rid].row for rid in cached.request_ids], np.int64)
        wrong = np.flatnonzero(self.rows.num_computed[cached_rows] != cached.num_computed_tokens)
        if len(wrong):
            i = wrong[0]
            raise RuntimeError(
                f"request {cached.request_ids[i]}: worker computed "
                f"{self.rows.num_computed[cached_rows[i]]} tokens, plan says "
                f"{cached.num_computed_tokens[i]}"
            )
        starts = cached.block_starts
        for i in np.flatnonzero((starts[1:] > starts[:-1]) | cached.replace_block_table):
            blocks = cached.new_block_ids[starts[i] : starts[i + 1]]
            if cached.replace_block_table[i]:
                tables.replace(cached_rows[i], blocks)
            else:
                tables.append(cached_rows[i], blocks)
        if not request_ids and not cached.request_ids:
            return LaunchedStep(worker_pb2.StepResult())
        request_ids += cached.request_ids
        rows = np.concatenate([np.array(new_rows, np.int64), cached_rows])
        counts = np.concatenate([np.array(new_counts, np.int64), cached.num_scheduled_tokens])
        return self._run(request_ids, rows, counts)

    @staticmethod
    def wait(step: LaunchedStep) -> None:
        """Blocks until a launched step's tokens are on the host (releases the GIL meanwhile)."""
        if step.done is not None:
            step.done.synchronize()

    def finish(self, step: LaunchedStep) -> worker_pb2.StepResult:
        """Waits for a launched step's tokens and appends them; returns its StepResult."""
        if not step.request_ids:  # nothing sampled (a prefill chunk alone): nothing to wait for
            self._time_device_idle(step)
            return step.result
        self.wait(step)
        self._time_device_idle(step)
        tokens = step.tokens.numpy()  # the one host copy of the step's tokens
        self.rows.append(step.rows, step.epochs, tokens)
        self._last_done = time.perf_counter()
        result = step.result
        result.request_ids.extend(step.request_ids)
        result.token_ids.extend(tokens.tolist())
        if step.logprobs_asked is not None:
            _add_logprobs(result, step.logprobs_asked, step.out)
        return result

    def _new_state(self, new: worker_pb2.NewRequest) -> RequestState:
        state = RequestState(row=self.block_tables.add(list(new.block_ids)))
        token_ids = np.fromiter(new.token_ids, dtype=np.int32, count=len(new.token_ids))
        self.rows.add(state.row, token_ids, new.num_computed_tokens)
        self.sampling.add(state.row, new.sampling)
        return state

    def _run(self, request_ids: list[str], rows: np.ndarray, counts: np.ndarray) -> LaunchedStep:
        """Builds and launches the step of sequences i = 0..n-1: counts[i] tokens [n] of the
        request of request_ids[i], rows[i] [n] of RequestRows and BlockTables."""
        bs, tables, held = self.block_size, self.block_tables, self.rows
        starts = held.num_computed[rows]  # [n] computed tokens before this step
        ends = starts + counts  # [n] each sequence's context after this step
        beyond = (ends > held.num_tokens[rows]) | (ends > tables.lengths[rows] * bs)
        if beyond.any():
            i = int(np.argmax(beyond))
            raise RuntimeError(
                f"request {request_ids[i]}: {counts[i]} tokens scheduled past its tokens or blocks"
            )
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int64)  # [n + 1]
        np.cumsum(counts, out=query_start_loc[1:])
        # Per input token [num_tokens]: its sequence, its row, its position in its request.
        token_seq = np.repeat(np.arange(len(rows)), counts)
        token_rows = rows[token_seq]
        positions = np.arange(query_start_loc[-1]) - query_start_loc[token_seq] + starts[token_seq]
        slots = tables.table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        # A token not on the host yet (at most one a sequence, its last input) is read on the
        # device from the newest launched step's sampled tokens, at its row there (sources).
        on_host = positions < held.num_known[token_rows]
        ids = np.where(on_host, held.tokens[token_rows, positions], 0).astype(np.int64)
        sources = np.where(on_host, -1, held.pending_index[token_rows])
        sample_seqs = np.flatnonzero(ends == held.num_tokens[rows])  # the sequences that sample
        sample_rows = rows[sample_seqs]
        if len(sample_seqs) < len(rows):
            request_ids = [request_ids[i] for i in sample_seqs]
        graph_size = None
        chunks = counts > 1  # prefill chunks of more than one token
        if self.graphs is not None and counts[chunks] @ ends[chunks] <= GRAPH_PREFILL_PAIRS:
            graph_size = self.graphs.size_for(len(ids))  # None: more tokens than any graph
        result = worker_pb2.StepResult(cuda_graph=graph_size is not None)
        if graph_size is None and self.pieces is not None:
            result.piecewise_graph = self.pieces.size_for(len(ids)) is not None
        if self.device.type != "cuda":
            result.idle_ms = (time.perf_counter() - self._last_done) * 1e3
        greedy = None  # the samplers' greedy tokens, when a graph computed them
        last_inputs = query_start_loc[1:][sample_seqs] - 1  # [num_samplers] in the batch
        if graph_size is not None:
            # One row a token, at its position, attending to its prefix: the tokens before it in
            # its chunk were written to the cache in this step, before any row reads it.
            width = int(-(-ends.max() // bs))
            local, greedy = self.graphs.run(
                graph_size, ids, sources, positions, slots, tables.table[token_rows, :width]
            )
            if len(last_inputs) < len(ids):  # rows of tokens that sample nothing
                samplers = to_device_async(torch.from_numpy(last_inputs), self.device)
                local, greedy = local[samplers], greedy[samplers]
        else:
            hidden = self._run_eager(
                ids,
                sources,
                positions,
                slots,
                query_start_loc,
                ends,
                rows,
                last_inputs,
                result.piecewise_graph,
            )
            if len(sample_seqs):
                local = self.model.lm_head.local_logits(hidden)
        step = LaunchedStep(result, request_ids, sample_rows, held.epoch[sample_rows])
        if len(sample_rows):
            self._sample(local, greedy, step)
        if self.device.type == "cuda":
            step.done = torch.cuda.Event(enable_timing=True)
            step.done.record()
        held.launched(rows, counts, sample_rows)
        return step

    def _time_device_idle(self, step: LaunchedStep) -> None:
        """Sets the result's idle_ms on CUDA: the device time between the end of the step
        finished before and this step's start (the stream ran dry while the host built it).

            stream  ..prev..|done  (idle)  start|..step..|done
        A start event that has not fired yet is still queued behind earlier work: no gap."""
        if step.done is None:  # launched no device work (an empty plan)
            return
        before, self._done_before = self._done_before, step.done
        if before is None or not step.start.query():
            return
        step.result.idle_ms = max(before.elapsed_time(step.start), 0.0)

    def _run_eager(
        self,
        ids: np.ndarray,
        sources: np.ndarray,
        positions: np.ndarray,
        slots: np.ndarray,
        query_start_loc: np.ndarray,
        ends: np.ndarray,
        rows: np.ndarray,
        last_inputs: np.ndarray,
        piecewise: bool,
    ) -> torch.Tensor:
        """The forward pass over any batch of n sequences and num_tokens tokens (sequence i's
        are query_start_loc[i]:query_start_loc[i + 1]): per token ids, sources, positions,
        slots [num_tokens]; per sequence query_start_loc [n + 1], ends [n], rows [n]. Its
        inputs move to the device in one copy; with `piecewise` it replays the piecewise graphs.
        Returns the hidden states of the tokens last_inputs [num_samplers]: [num_samplers,
        hidden]."""
        max_seq_len = int(ends.max())
        query_lens = query_start_loc[1:] - query_start_loc[:-1]  # [n]
        tables = self.block_tables.table[
            rows, : self.block_tables.step_width(max_seq_len, self.block_size)
        ]
        in_flight = bool((sources >= 0).any())
        select = len(last_inputs) < len(ids)
        int64 = [ids, positions, slots, last_inputs, *([sources] if in_flight else [])]
        (ids_d, positions_d, slots_d, last_d, *sources_d), (tables_d, seq_lens_d, qsl_d) = (
            self.staging.to_device(int64, [tables, ends, query_start_loc])
        )
        if in_flight:  # a token not on the host yet: the newest step's sampled one
            src = sources_d[0]
            ids_d = torch.where(src >= 0, self._sampled[src.clamp(min=0)], ids_d)
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            block_tables=tables_d,
            seq_lens=seq_lens_d,
            query_start_loc=qsl_d,
            max_query_len=int(query_lens.max()),
            max_seq_len=max_seq_len,
            one_token_context=int(ends[query_lens == 1].sum()),
        )
        if piecewise:
            size = self.pieces.size_for(len(ids))
            hidden = self.pieces.run(size, ids_d, positions_d, slots_d, meta)
        else:
            hidden = self.model(ids_d, positions_d, meta)
        return hidden[last_d] if select else hidden

    @torch.inference_mode()
    def profile_sampler(self, num_rows: int) -> None:
        """Samples num_rows rows of random logits over the whole vocabulary with every option
        on (SamplingRows.profile_batch): the sampler's peak memory, which ProfileMemory's step
        of one or a few sequences does not reach."""
        if num_rows < 1:
            return
        vocab = self.model.vocab_size
        logits = torch.randn(num_rows, vocab, device=self.device)
        sample(
            logits, self.sampling.profile_batch(num_rows, vocab, self.device), self.shared_generator
        )

    def _sample(self, local: torch.Tensor, greedy: torch.Tensor | None, step: LaunchedStep) -> None:
        """Picks each sampling request's token from this rank's logits of its last row
        (local [num_samplers, vocab_shard]; greedy: their greedy tokens, when a graph left
        them): the greedy argmax on every rank when every row is plain greedy, else rank 0
        gathers the logits, samples and broadcasts. Every rank keeps the tokens on the device
        for the next step's inputs and starts their copy to the host (finish() appends them)."""
        lm_head = self.model.lm_head
        num_samplers = len(step.rows)
        if self.sampling.plain_greedy[step.rows].all():
            sampled = greedy if greedy is not None else lm_head.greedy(local)
        else:
            logits = lm_head.gather_logits(local)
            if logits is None:
                sampled = torch.empty(num_samplers, dtype=torch.int64, device=self.device)
            else:
                batch = self.sampling.batch(step.rows, self.rows, logits.shape[-1], self.device)
                step.out = sample(logits, batch, self.shared_generator)
                self.sampling.count(step.rows, step.out.token_ids)
                if step.out.sampled_logprobs is not None:
                    step.logprobs_asked = self.sampling.logprobs[step.rows]
                sampled = step.out.token_ids
            sampled = distributed.broadcast_from_rank0(sampled)
        self._sampled = sampled
        # The next graph reads the samplers' tokens from rows 0..num_samplers - 1 of its own
        # buffer, where a replay of decodes alone left them.
        if self.graphs is not None and sampled.data_ptr() != self.graphs.sampled.data_ptr():
            self.graphs.sampled[:num_samplers].copy_(sampled)
        # The host's copy, taken now: the next launch may overwrite sampled (a graph's buffer).
        if self.device.type == "cuda":
            step.tokens = torch.empty(num_samplers, dtype=torch.int64, pin_memory=True)
            step.tokens.copy_(sampled, non_blocking=True)
        else:
            step.tokens = sampled.clone()


def _add_logprobs(result: worker_pb2.StepResult, asked: np.ndarray, out: SampleOutput) -> None:
    """Packs each row's logprobs: its sampled token's, then as many top ones as it asked
    (asked [rows]: -1 for a row that asked for none)."""
    result.sampled_logprobs.extend(out.sampled_logprobs.tolist())
    result.sampled_ranks.extend(out.sampled_ranks.tolist())
    top_ids, top_logprobs = out.top_ids.tolist(), out.top_logprobs.tolist()
    for row, k in enumerate(asked.tolist()):
        result.num_top_logprobs.append(k)
        result.top_token_ids.extend(top_ids[row][: max(k, 0)])
        result.top_logprobs.extend(top_logprobs[row][: max(k, 0)])
