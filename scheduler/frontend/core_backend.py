"""The Backend of a frontend process (backend.py): requests validated and tokenized here, sent
to the engine core as token ids, and streamed back as text.

    generate(GenerateRequest)
      InputProcessor.process (executor thread)    -> AddRequest, SamplingParams
      CoreSet.add (routed to an engine core)      -> the request's queue of CoreOutputs
      per batch of what the queue holds: CompletionStream per completion (text, stop strings;
      a stop string is sent to the core), then a GenerateResponse per completion with news

A frontend that falls behind the core streams fewer, larger messages: its core link's reader
thread hands the event loop every core message that came while the loop was busy, at once
(core_client.py), and a request sends all that its queue holds in one message a completion.
The first message (time to first token) is sent as soon as its tokens come.

A request whose engine core goes (its stream breaks) before the client was sent anything is
sent again, whole, to a core that serves; one that was sent something ends UNAVAILABLE.

Admission: a frontend holds at most server.max_concurrent_requests requests admitted and
unfinished, counted from admission (before tokenizing) until the core has ended every
completion, not until the client leaves: an abandoned request still holds its blocks until
its abort reaches the core. Beyond it, generate() refuses RESOURCE_EXHAUSTED before any work.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc

from protos import serving_pb2
from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.frontend.backend import ServingError
from scheduler.frontend.completion_stream import CompletionStream
from scheduler.frontend.core_client import CORE_GONE, CoreOutputs
from scheduler.frontend.core_set import CoreSet
from scheduler.frontend.input_processor import InputProcessor
from scheduler.frontend.tokenizer import Tokenizer
from scheduler.sampling_params import RequestOutputKind, SamplingParams

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
LOADING = "the model is still loading; retry shortly"


class CoreBackend:
    """Serves on the event loop it is used on; the model is known once the tokenizer is loaded
    (set_tokenizer) and the core has sent it (set_model_info)."""

    def __init__(
        self,
        model_name: str,
        core_addresses: Sequence[str],
        max_concurrent_requests: int = 0,
        core_secret: str | None = None,
        heartbeat: Heartbeat = HEARTBEAT,
        ready_wait_s: float = 0.0,
    ):
        """core_addresses: the engine cores' (requests are routed over them, CoreSet).
        max_concurrent_requests: the most requests admitted and unfinished (0 = no limit).
        core_secret: the cluster secret the cores demand (protos/cluster_secret.py).
        heartbeat: how often the core's stream speaks at least (protos/heartbeat.py).
        ready_wait_s: how long a call that comes before the model is known waits for it
        before it is refused UNAVAILABLE (0: refused at once, as while the model loads)."""
        self.model_name = model_name
        self.core = CoreSet(core_addresses, self.set_model_info, core_secret, heartbeat)
        self.max_concurrent_requests = max_concurrent_requests
        # Admitted, being checked and tokenized, not yet registered with the core (event loop
        # only: no lock). With core.num_requests, what max_concurrent_requests bounds.
        self._num_preparing = 0
        self._tokenizer: Tokenizer | None = None
        self._model_info: serving_pb2.ModelInfoResponse | None = None
        self._input: InputProcessor | None = None
        self._token_texts: dict[int, str] = {}  # token id -> its own text (at most the vocab)
        self.became_ready = asyncio.Event()
        self._ready_wait_s = ready_wait_s

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

    async def _until_ready(self) -> None:
        if self._input is None and self._ready_wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.became_ready.wait(), self._ready_wait_s)
        if self._input is None:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, LOADING)
        if not self.core.connected:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, CORE_GONE)

    async def generate(
        self,
        request: serving_pb2.GenerateRequest,
        owner: str = "",
        refuse_past_context: bool = False,
    ) -> AsyncIterator[serving_pb2.GenerateResponse]:
        await self._until_ready()
        self._admit()
        self._num_preparing += 1
        try:
            loop = asyncio.get_running_loop()
            process = self._input.process
            add, params = await loop.run_in_executor(None, process, request, refuse_past_context)
        except ValueError as e:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        finally:
            self._num_preparing -= 1
        add.owner = owner
        # Shown only at its end, with no stop string to find in its text as it grows: its
        # task need not wake at every step.
        wake_at_end = params.output_kind is RequestOutputKind.FINAL_ONLY and not params.stop
        # Registered with no await since _num_preparing fell: the count never dips.
        outputs = self.core.add(add, wake_at_end)
        request_id, prompt = add.request_id, list(add.prompt_token_ids)
        streams = self._streams(request_id, params)
        ended = False  # by the core: every completion, or an error
        sent = False  # anything to the client yet
        try:
            while not ended:
                batch = [await outputs.get()]
                while not outputs.empty():  # a client that fell behind: merged
                    batch.append(outputs.get_nowait())
                if not sent and any(o.core_gone for o in batch) and self.core.serving:
                    # Its engine core went before the client saw anything: another computes
                    # it from the start (what the gone one made was never sent).
                    outputs = self.core.add(add, wake_at_end)
                    streams = self._streams(request_id, params)
                    continue
                responses = self._advance(request_id, streams, batch, prompt)
                # Before they are sent: a client that leaves after its last one has
                # nothing to abort (the id may already be another request's).
                ended = all(s.sent_last for s in streams)
                for response in responses:
                    sent = True
                    yield response
        except ServingError:
            ended = True  # the core ended the request with an error
            raise
        finally:
            if not ended:  # the client left (or its deadline passed): the core frees it
                self.core.abort(request_id)

    def _streams(self, request_id: str, params: SamplingParams) -> list[CompletionStream]:
        return [
            CompletionStream(request_id, i, params, self._tokenizer, self._token_text)
            for i in range(params.n)
        ]

    @property
    def num_admitted(self) -> int:
        """Requests admitted and not yet ended by the core (max_concurrent_requests bounds it)."""
        return self._num_preparing + self.core.num_requests

    def _admit(self) -> None:
        """Refuses a request beyond max_concurrent_requests, before any work is done for it."""
        limit = self.max_concurrent_requests
        if limit and self.num_admitted >= limit:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this frontend holds server.max_concurrent_requests={limit} unfinished "
                "requests; retry later",
            )

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
        await self._until_ready()
        return await self.core.abort_by_id(request_id, owner)

    async def model_info(self) -> serving_pb2.ModelInfoResponse:
        await self._until_ready()
        info = serving_pb2.ModelInfoResponse()
        info.CopyFrom(self._model_info)
        info.eos_token_ids.extend(sorted(self._tokenizer.eos_token_ids))
        return info

    async def server_info(self) -> serving_pb2.ServerInfoResponse:
        await self._until_ready()
        return await self.core.server_info()

    async def scale(self, replicas: int) -> serving_pb2.ScaleResponse:
        """Sets how many replicas serve (the core places, brings up or drains them)."""
        await self._until_ready()
        return await self.core.scale(replicas)
