"""The offline API, vLLM's shape: LLM(model=...).generate(prompts, sampling_params).

It starts a local cluster (Ray, a scheduler actor, workers) and sends every prompt through the
gRPC client concurrently, so continuous batching serves them together.
"""

import asyncio
import atexit
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.client import AsyncClient, Prompt
from cluster.config import Config, load_config
from protos import serving_pb2
from scheduler.config import ServerConfig
from scheduler.logprobs import Logprob, PositionLogprobs
from scheduler.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # when logprobs were asked
    logprobs: list[PositionLogprobs] | None = None  # per token: the sampled one's, then the top k
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


PromptInput = str | dict[str, Any]  # "text", {"prompt": "text"} or {"prompt_token_ids": [...]}

_MODEL_KEYS = (
    "tokenizer",
    "dtype",
    "max_model_len",
    "seed",
    "load_format",
    "device",
    "enforce_eager",
)
_PARALLEL_KEYS = ("tensor_parallel_size",)
_CACHE_KEYS = (
    "gpu_memory_utilization",
    "block_size",
    "cpu_cache_gb",
    "num_blocks",
    "enable_prefix_caching",
)
_SCHEDULER_KEYS = ("max_num_seqs", "max_num_batched_tokens")


class LLM:
    """An in-process pagedserve cluster. Keyword arguments are vLLM's engine arguments that
    pagedserve has (model, dtype, max_model_len, seed, gpu_memory_utilization, block_size,
    max_num_seqs, max_num_batched_tokens, ...); config= starts from a YAML file instead."""

    def __init__(self, model: str | None = None, config: str | None = None, **kwargs: Any) -> None:
        from cluster.launcher import Cluster, replace_sections  # Ray loads with the first LLM

        unknown = set(kwargs) - {*_MODEL_KEYS, *_PARALLEL_KEYS, *_CACHE_KEYS, *_SCHEDULER_KEYS}
        if unknown:
            raise TypeError(f"LLM() got unknown arguments: {', '.join(sorted(unknown))}")
        base = load_config(config) if config else Config()
        model_values = {k: kwargs[k] for k in _MODEL_KEYS if k in kwargs}
        if model is not None:
            model_values["model"] = model
        config = replace_sections(
            base,
            model=model_values,
            parallel={k: kwargs[k] for k in _PARALLEL_KEYS if k in kwargs},
            cache={k: kwargs[k] for k in _CACHE_KEYS if k in kwargs},
            scheduler={k: kwargs[k] for k in _SCHEDULER_KEYS if k in kwargs},
        )
        # The offline engine serves this process only: loopback, any free port, no TLS, tokens
        # or limits.
        self.config = dataclasses.replace(config, server=ServerConfig(port=0))
        self._cluster = Cluster(self.config)
        self.address = self._cluster.start()
        atexit.register(self.shutdown)

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; outputs come back in input order, each with its n
        completions in index order. priority: one per prompt, for the "priority" policy."""
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(
                    f"sampling_params has {len(params)} entries for {len(prompts)} prompts"
                )
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"priority has {len(priorities)} entries for {len(prompts)} prompts")
        return asyncio.run(self._generate_all(prompts, params, priorities))

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Generates a reply to each conversation, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = [sampling_params or SamplingParams()] * len(conversations)
        priorities = [0] * len(conversations)
        return asyncio.run(self._generate_all(list(conversations), params, priorities, chat=True))

    async def _generate_all(
        self, prompts: list, params: list[SamplingParams], priorities: list[int], chat: bool = False
    ) -> list[RequestOutput]:
        client = AsyncClient(self.address)
        try:
            return list(
                await asyncio.gather(
                    *(
                        self._generate_one(client, prompt, p, priority, chat)
                        for prompt, p, priority in zip(prompts, params, priorities, strict=True)
                    )
                )
            )
        finally:
            await client.close()

    @staticmethod
    async def _generate_one(
        client: AsyncClient, prompt: Any, params: SamplingParams, priority: int, chat: bool
    ) -> RequestOutput:
        text_prompt: str | None = None
        wire: Prompt
        if chat:
            wire = prompt
        elif isinstance(prompt, str):
            wire = text_prompt = prompt
        elif "prompt_token_ids" in prompt:
            wire = list(prompt["prompt_token_ids"])
        elif "prompt" in prompt:
            wire = text_prompt = prompt["prompt"]
        else:
            raise ValueError(f"prompt {prompt!r}: expected a string, prompt or prompt_token_ids")
        outputs = [CompletionOutput(index=i, text="", token_ids=[]) for i in range(params.n)]
        # Offline, nothing reads a completion before it ends: one message each (as vLLM's LLM).
        params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
        async for delta in client.generate(wire, params, priority=priority):
            out = outputs[delta.index]
            out.text += delta.text
            out.token_ids.extend(delta.token_ids)
            if params.logprobs is not None:
                out.logprobs = out.logprobs or []
                out.logprobs.extend(_position(p) for p in delta.logprobs)
                out.cumulative_logprob = delta.cumulative_logprob
            if delta.finish_reason:  # a completion's last message
                out.finish_reason = delta.finish_reason
                out.stop_reason = _stop_reason(delta)
                prompt_token_ids = list(delta.prompt_token_ids)
        # The stream ends when every completion has finished (or raises).
        return RequestOutput(
            request_id=delta.request_id,
            prompt=text_prompt,
            prompt_token_ids=prompt_token_ids,
            outputs=outputs,
        )

    def shutdown(self) -> None:
        if self._cluster is not None:
            self._cluster.shutdown()
            self._cluster = None


def _position(msg: serving_pb2.TokenLogprobs) -> PositionLogprobs:
    return {e.token_id: Logprob(e.logprob, e.rank, e.decoded_token) for e in msg.entries}


def _stop_reason(msg: serving_pb2.GenerateResponse) -> int | str | None:
    kind = msg.WhichOneof("stop_reason")
    return None if kind is None else getattr(msg, kind)
