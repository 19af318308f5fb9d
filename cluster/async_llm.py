"""The asyncio engine client, vLLM's AsyncLLM shape: streams a request's outputs as they grow,
inside the caller's event loop.

    engine = AsyncLLM(llm.address)          # an LLM's engine, or any running server's address
    async for out in engine.generate("What is the capital of France?", params, "req-1"):
        print(out.outputs[0].text)          # the text so far
"""

import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

from cluster.client import AsyncClient, Credentials, Prompt
from cluster.outputs import OutputCollector, RequestOutput, collect_async
from scheduler.sampling_params import RequestOutputKind, SamplingParams

PromptInput = str | dict[str, Any]  # "text", {"prompt": "text"} or {"prompt_token_ids": [...]}
ChatMessages = list[dict[str, str]]  # [{"role": ..., "content": ...}, ...]


def parse_prompt(prompt: PromptInput) -> tuple[Prompt, str | None]:
    """A prompt as vLLM takes it -> (what the wire carries, its text or None for token ids)."""
    if isinstance(prompt, str):
        return prompt, prompt
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"]), None
    if isinstance(prompt, dict) and "prompt" in prompt:
        return prompt["prompt"], prompt["prompt"]
    raise ValueError(f"prompt {prompt!r}: expected a string, prompt or prompt_token_ids")


class AsyncLLM:
    """A client of a running pagedserve engine for asyncio code. Create it inside the event loop
    that uses it; close() it there."""

    def __init__(self, address: str, credentials: Credentials | None = None) -> None:
        self.address = address
        self._client = AsyncClient(address, credentials)

    async def generate(
        self,
        prompt: PromptInput,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request so far after every message the server sends: cumulative outputs
        (vLLM's default), the last one finished. With output_kind FINAL_ONLY the server sends
        each completion once, at its end. Each yielded output is the caller's to keep.
        Closing the iterator early cancels the call, which aborts the request."""
        wire, text = parse_prompt(prompt)
        async for out in self._stream(wire, text, sampling_params, request_id, priority):
            yield out

    async def chat(
        self,
        messages: ChatMessages,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """As generate, for a conversation rendered with the model's chat template."""
        async for out in self._stream(messages, None, sampling_params, request_id, priority):
            yield out

    async def complete(
        self,
        prompt: PromptInput | ChatMessages,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> RequestOutput:
        """The finished request, each completion sent once (FINAL_ONLY): what an offline batch
        needs. A list of {"role", "content"} dicts is a conversation."""
        if isinstance(prompt, list):
            wire, text = prompt, None
        else:
            wire, text = parse_prompt(prompt)
        params = dataclasses.replace(
            sampling_params or SamplingParams(), output_kind=RequestOutputKind.FINAL_ONLY
        )
        messages = self._client.generate(
            wire, params, request_id=request_id or _new_id(), priority=priority
        )
        return await collect_async(messages, params.n, text)

    async def _stream(
        self,
        wire: Prompt,
        text: str | None,
        sampling_params: SamplingParams | None,
        request_id: str | None,
        priority: int,
    ) -> AsyncIterator[RequestOutput]:
        params = sampling_params or SamplingParams()
        collector = OutputCollector(params.n, text, _token_ids(wire))
        async for msg in self._client.generate(
            wire, params, request_id=request_id or _new_id(), priority=priority
        ):
            collector.add(msg)
            yield collector.snapshot()
        collector.result()  # raises if the stream ended early

    async def spread(self, timeout: float = 5.0) -> int:
        """Sends later requests to the server's frontends in turn rather than to the one its
        connection landed on (AsyncClient.spread); returns how many frontends take them."""
        return await self._client.spread(timeout)

    async def abort(self, request_id: str) -> bool:
        """Stops a request (its stream ends with finish_reason "abort"); whether it was found."""
        return await self._client.abort(request_id)

    async def close(self) -> None:
        await self._client.close()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()


def _new_id() -> str:
    return uuid.uuid4().hex


def _token_ids(wire: Prompt) -> list[int] | None:
    """The prompt's token ids where the caller gave them (else the server sends them)."""
    return wire if wire and isinstance(wire, list) and isinstance(wire[0], int) else None
