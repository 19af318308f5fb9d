"""The offline API, vLLM's shape: LLM(model=...).generate(prompts, sampling_params).

It starts a local cluster (Ray, a scheduler actor, workers) and sends every prompt through an
AsyncLLM concurrently, so continuous batching serves them together. The AsyncLLM lives on an
event loop of the LLM's own, on a helper thread: generate blocks its caller alike whether or
not the caller runs an event loop of its own (a Jupyter cell, asyncio.run(...)).
"""

import asyncio
import atexit
import dataclasses
import threading
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from tqdm import tqdm

from cluster.async_llm import AsyncLLM, ChatMessages, PromptInput
from cluster.config import Config, load_config
from cluster.outputs import RequestOutput
from scheduler.config import ServerConfig
from scheduler.sampling_params import SamplingParams

T = TypeVar("T")

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
        source = config or "<LLM arguments>"  # what the config's errors name
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
        self.config = dataclasses.replace(config, server=ServerConfig(port=0, http_port=0))
        self._cluster = Cluster(self.config, source)
        self.address = self._cluster.start()
        atexit.register(self.shutdown)
        # The engine client's loop, on a thread of its own: every call of this LLM runs there.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="pagedserve-llm", daemon=True
        )
        self._thread.start()
        self._engine = self._run(_connect(self.address))

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt; outputs come back in input order, each with its n
        completions in index order. use_tqdm: a progress bar of finished prompts on stderr.
        priority: one per prompt, for the "priority" policy."""
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
        return self._run(self._generate_all(prompts, params, priorities, use_tqdm))

    def chat(
        self,
        messages: ChatMessages | list[ChatMessages],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates a reply to each conversation, rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params = [sampling_params or SamplingParams()] * len(conversations)
        priorities = [0] * len(conversations)
        return self._run(self._generate_all(list(conversations), params, priorities, use_tqdm))

    async def _generate_all(
        self,
        prompts: list[PromptInput | ChatMessages],
        params: list[SamplingParams],
        priorities: list[int],
        use_tqdm: bool,
    ) -> list[RequestOutput]:
        progress = _Progress(len(prompts)) if use_tqdm else None

        async def one(prompt, p: SamplingParams, priority: int) -> RequestOutput:
            out = await self._engine.complete(prompt, p, priority=priority)
            if progress is not None:
                progress.finished(out)
            return out

        tasks = [
            asyncio.ensure_future(one(*args))
            for args in zip(prompts, params, priorities, strict=True)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:  # the loop outlives this call: stop the requests still running
            for task in tasks:
                task.cancel()
            raise
        finally:
            if progress is not None:
                progress.close()

    def _run(self, coro: Awaitable[T]) -> T:
        """Runs coro on the engine client's loop and waits for it; an interrupt (Ctrl-C)
        cancels it, which cancels its calls and so aborts their requests."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def shutdown(self) -> None:
        if self._cluster is None:
            return
        if self._thread.is_alive():
            self._run(self._engine.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
        self._cluster.shutdown()
        self._cluster = None


async def _connect(address: str) -> AsyncLLM:
    engine = AsyncLLM(address)  # made on the loop that uses it
    await engine.spread()  # the batch's requests over every frontend, not one connection's
    return engine


class _Progress:
    """vLLM's progress bar: finished prompts, and the input and output tokens per second so far
    (every completion's tokens counted)."""

    def __init__(self, total: int) -> None:
        self._bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True)
        self._bar.set_postfix_str(_speeds(0.0, 0.0))
        self._input_tokens = 0
        self._output_tokens = 0

    def finished(self, out: RequestOutput) -> None:
        self._input_tokens += len(out.prompt_token_ids)
        self._output_tokens += sum(len(c.token_ids) for c in out.outputs)
        elapsed = self._bar.format_dict["elapsed"] or 1e-9
        self._bar.set_postfix_str(
            _speeds(self._input_tokens / elapsed, self._output_tokens / elapsed), refresh=False
        )
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _speeds(input_per_s: float, output_per_s: float) -> str:
    return f"est. speed input: {input_per_s:.2f} toks/s, output: {output_per_s:.2f} toks/s"
