"""The Backend of a frontend process (backend.py): requests validated and tokenized here, sent
to the engine core as token ids, and streamed back as text.

    generate(GenerateRequest)
      InputProcessor.process (executor thread)    -> AddRequest, SamplingParams
      CoreClient.add                              -> the request's queue of CoreOutputs
      per batch of what the queue holds: CompletionStream per completion (text, stop strings;
      a stop string is sent to the core), then a GenerateResponse per completion with news
"""

import asyncio
from collections.abc import AsyncIterator

import grpc

from protos import serving_pb2
from scheduler.frontend.backend import ServingError
from scheduler.frontend.completion_stream import CompletionStream
from scheduler.frontend.core_client import CORE_GONE, CoreClient, CoreOutputs
from scheduler.frontend.input_processor import InputProcessor
from scheduler.frontend.tokenizer import Tokenizer

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
LOADING = "the model is still loading; retry shortly"


class CoreBackend:
    """Serves on the event loop it is used on; the model is known once the tokenizer is loaded
    (set_tokenizer) and the core has sent it (set_model_info)."""

    def __init__(self, model_name: str, core_address: str, max_concurrent_requests: int = 0):
        self.model_name = model_name
        self.core = CoreClient(core_address, self.set_model_info)
        self.max_concurrent_requests = max_concurrent_requests  # 0 = no limit
        self.num_in_flight = 0  # generate() calls being served (on the event loop: no lock)
        self._tokenizer: Tokenizer | None = None
        self._model_info: serving_pb2.ModelInfoResponse | None = None
        self._input: InputProcessor | None = None
        self._token_texts: dict[int, str] = {}  # token id -> its own text (at most the vocab)
        self.became_ready = asyncio.Event()

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._update_ready()

    def set_model_info(self, info: serving_pb2.ModelInfoResponse) -> None:
        self._model_info = info
        self._update_ready()

    def _update_ready(self) -> None:
        if self._tokenizer is not None and self._model_info is not None:
            info = self._model_info
            self._input = InputProcessor(
                self._tokenizer, info.vocab_size, info.max_model_len, info.max_num_seqs
            )
            self.became_ready.set()

    def ready(self) -> bool:
        return self._input is not None and self.core.connected and self.core.serving

    def _require_ready(self) -> None:
        if self._input is None:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, LOADING)
        if not self.core.connected:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, CORE_GONE)

    async def generate(
        self, request: serving_pb2.GenerateRequest, owner: str = ""
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        self._require_ready()
        limit = self.max_concurrent_requests
        if limit and self.num_in_flight >= limit:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server.max_concurrent_requests={limit} requests are in flight; retry later",
            )
        self.num_in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            try:
                add, params = await loop.run_in_executor(None, self._input.process, request)
            except ValueError as e:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
            add.owner = owner
            outputs = self.core.add(add)
            request_id, prompt = add.request_id, list(add.prompt_token_ids)
            streams = [
                CompletionStream(request_id, i, params, self._tokenizer, self._token_text)
                for i in range(params.n)
            ]
            ended = False  # by the core: every completion, or an error
            try:
                while not ended:
                    batch = [await outputs.get()]
                    while not outputs.empty():  # a client that fell behind: merged
                        batch.append(outputs.get_nowait())
                    responses = self._advance(request_id, streams, batch, prompt)
                    # Before they are sent: a client that leaves after its last one has
                    # nothing to abort (the id may already be another request's).
                    ended = all(s.sent_last for s in streams)
                    for response in responses:
                        yield response
            except ServingError:
                ended = True  # the core ended the request with an error
                raise
            finally:
                if not ended:  # the client left: the core frees what the request holds
                    self.core.abort(request_id)
        finally:
            self.num_in_flight -= 1

    def _advance(
        self,
        request_id: str,
        streams: list[CompletionStream],
        batch: list[CoreOutputs],
        prompt: list[int],
    ) -> list[serving_pb2.GenerateResponse]:
        """Applies core outputs to the completions; the responses they make."""
        finished = []
        for outputs in batch:
            for index, token, logprobs in outputs.tokens:
                streams[index].receive(token, logprobs)
            for end in outputs.finished:
                if end.HasField("error"):
                    raise ServingError(_STATUS_CODES[end.error.code], end.error.message)
                finished.append(end)
        ending = {end.index for end in finished}
        for stream in streams:
            stop = stream.detokenize()
            if stop is not None and stream.index not in ending:
                self.core.stop(request_id, stream.index, stop)
        for end in finished:
            streams[end.index].finish(end)
        responses = (stream.response(prompt) for stream in streams)
        return [r for r in responses if r is not None]

    def _token_text(self, token: int) -> str:
        """decode([token]) with special tokens kept, cached: with logprobs=20 a step of 256
        completions names 5376 tokens, mostly the same few thousand."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self._tokenizer.decode([token], False)
        return text

    async def abort(self, request_id: str, owner: str = "") -> bool:
        self._require_ready()
        return await self.core.abort_by_id(request_id, owner)

    async def model_info(self) -> serving_pb2.ModelInfoResponse:
        self._require_ready()
        info = serving_pb2.ModelInfoResponse()
        info.CopyFrom(self._model_info)
        info.eos_token_ids.extend(sorted(self._tokenizer.eos_token_ids))
        return info

    async def server_info(self) -> serving_pb2.ServerInfoResponse:
        self._require_ready()
        return await self.core.server_info()

    async def scale(self, replicas: int) -> serving_pb2.ScaleResponse:
        """Sets how many replicas serve (the core places, brings up or drains them)."""
        self._require_ready()
        return await self.core.scale(replicas)
