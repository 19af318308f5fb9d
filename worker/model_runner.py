"""Runs one StepPlan on this rank: keeps each request's tokens and block table, builds the
flat batch, runs the model over the paged KV cache and samples.

A request samples a token when its computed tokens catch up with its total (the end of a
prefill, or every decode step); a partial prefill chunk only fills the cache.
"""

from dataclasses import dataclass, field

import torch

from protos import worker_pb2
from worker import distributed
from worker.layers.attention import AttentionMetadata
from worker.sampler import SamplingBatch, sample


@dataclass
class RequestState:
    """What this rank holds of one request. token_ids grows by the tokens rank 0 samples."""

    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None = field(default=None, repr=False)


class ModelRunner:
    def __init__(
        self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = 0
        self.requests: dict[str, RequestState] = {}
        self.shared_generator = torch.Generator(device=device).manual_seed(seed)

    def bytes_per_block(self, block_size: int) -> int:
        num_layers, kv_heads, head_dim = self.model.kv_cache_spec()
        per_token = 2 * num_layers * kv_heads * head_dim
        return per_token * block_size * torch.tensor([], dtype=self.dtype).element_size()

    def init_cache(self, num_blocks: int, block_size: int) -> None:
        """Allocates per layer K and V: [num_blocks, block_size, num_kv_heads_local, head_dim]."""
        _, kv_heads, head_dim = self.model.kv_cache_spec()
        shape = (num_blocks, block_size, kv_heads, head_dim)
        for attn in self.model.attention_layers():
            attn.key_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            attn.value_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.block_size = block_size
        self.requests.clear()

    @torch.inference_mode()
    def execute(self, plan: worker_pb2.StepPlan) -> tuple[list[str], list[int]]:
        """Applies the plan's diff, runs the step; returns the ids and tokens it sampled."""
        for rid in (*plan.finished_request_ids, *plan.preempted_request_ids):
            self.requests.pop(rid, None)
        scheduled: list[tuple[str, RequestState, int]] = []
        for new in plan.new_requests:
            state = self._new_state(new)
            self.requests[new.request_id] = state
            scheduled.append((new.request_id, state, new.num_scheduled_tokens))
        for cached in plan.cached_requests:
            state = self.requests[cached.request_id]
            if state.num_computed_tokens != cached.num_computed_tokens:
                raise RuntimeError(
                    f"request {cached.request_id}: worker computed {state.num_computed_tokens} "
                    f"tokens, plan says {cached.num_computed_tokens}"
                )
            state.block_ids.extend(cached.new_block_ids)
            scheduled.append((cached.request_id, state, cached.num_scheduled_tokens))
        if not scheduled:
            return [], []
        return self._run(scheduled)

    def _new_state(self, new: worker_pb2.NewRequest) -> RequestState:
        opts = new.sampling
        gen = None
        if opts.HasField("seed"):
            gen = torch.Generator(device=self.device).manual_seed(opts.seed)
        return RequestState(
            token_ids=list(new.token_ids),
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            temperature=opts.temperature,
            top_p=opts.top_p,
            top_k=opts.top_k,
            generator=gen,
        )

    def _run(self, scheduled: list[tuple[str, RequestState, int]]) -> tuple[list[str], list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_start_loc = [0]
        sample_rows: list[int] = []  # row of each sampling request's last token
        samplers: list[tuple[str, RequestState]] = []
        for rid, state, n in scheduled:
            start, end = state.num_computed_tokens, state.num_computed_tokens + n
            if end > len(state.token_ids) or end > len(state.block_ids) * bs:
                raise RuntimeError(f"request {rid}: {n} tokens scheduled past its tokens or blocks")
            input_ids.extend(state.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(state.block_ids[p // bs] * bs + p % bs for p in range(start, end))
            seq_lens.append(end)
            query_start_loc.append(query_start_loc[-1] + n)
            if end == len(state.token_ids):
                sample_rows.append(query_start_loc[-1] - 1)
                samplers.append((rid, state))
        max_blocks = max(len(state.block_ids) for _, state, _ in scheduled)
        block_tables = [
            state.block_ids + [0] * (max_blocks - len(state.block_ids)) for _, state, _ in scheduled
        ]

        def tensor(data: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(block_tables, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            query_start_loc=tensor(query_start_loc, torch.int32),
            max_query_len=max(n for _, _, n in scheduled),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model(tensor(input_ids, torch.int64), tensor(positions, torch.int64), meta)
        for _, state, n in scheduled:
            state.num_computed_tokens += n
        if not samplers:
            return [], []
        # Rank 0 gathers the logits and samples; every rank then appends the same tokens.
        logits = self.model.compute_logits(hidden[tensor(sample_rows, torch.int64)])
        if logits is None:
            sampled = torch.empty(len(samplers), dtype=torch.int64, device=self.device)
        else:
            batch = SamplingBatch(
                temperatures=tensor([s.temperature for _, s in samplers], torch.float32),
                top_ps=tensor([s.top_p for _, s in samplers], torch.float32),
                top_ks=tensor([s.top_k for _, s in samplers], torch.int64),
                generators=[s.generator for _, s in samplers],
            )
            sampled = sample(logits, batch, self.shared_generator)
        tokens = distributed.broadcast_from_rank0(sampled).tolist()
        for (_, state), token in zip(samplers, tokens, strict=True):
            state.token_ids.append(token)
        return [rid for rid, _ in samplers], tokens
