"""A frontend behind the core streams fewer, larger messages: the core messages a request's
queue holds when it reads it leave in one message, their text and token ids unchanged. The
core's messages are put on the request's queue by the test, at the turns it chooses."""

import asyncio

from protos import frontend_pb2, serving_pb2
from scheduler.frontend.core_backend import CoreBackend
from scheduler.frontend.core_client import CoreOutputs
from scheduler.sampling_params import SamplingParams
from tests.scheduler.fake_worker import TIMEOUT
from tests.scheduler.frontend.core_fixture import PieceTokenizer


class QueueCore:
    """Stands for the backend's CoreClient: hands the test each request's queue."""

    connected = serving = True
    num_requests = 0

    def __init__(self) -> None:
        self.added = asyncio.Event()
        self.aborted: list[str] = []

    def add(self, msg: frontend_pb2.AddRequest, wake_at_end: bool = False) -> asyncio.Queue:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.added.set()
        return self.queue

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def tokens(*ids: int, finished: bool = False) -> CoreOutputs:
    """The core's message of one step for completion 0: ids, then its end if finished."""
    ends = [frontend_pb2.Finished(index=0, finish_reason="length")] if finished else []
    return CoreOutputs(tokens=[(0, t, None) for t in ids], finished=ends)


def test_the_steps_a_request_finds_queued_leave_in_one_message():
    async def main() -> list[serving_pb2.GenerateResponse]:
        backend = CoreBackend("fake", ["unused:0"])
        core = backend.core = QueueCore()
        backend.set_tokenizer(PieceTokenizer())
        backend.set_model_info(
            serving_pb2.ModelInfoResponse(vocab_size=10, max_model_len=64, max_num_seqs=8)
        )
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        msg = serving_pb2.GenerateRequest(params=params.to_proto())
        msg.prompt_token_ids.ids.append(1)
        stream = backend.generate(msg)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.wait_for(core.added.wait(), TIMEOUT)
        core.queue.put_nowait(tokens(1))
        got = [await asyncio.wait_for(first, TIMEOUT)]
        # Two steps queued before the request reads its queue again: one message.
        core.queue.put_nowait(tokens(2))
        core.queue.put_nowait(tokens(3))
        got.append(await anext(stream))
        core.queue.put_nowait(tokens(4, finished=True))
        got += [r async for r in stream]
        assert core.aborted == []
        return got

    got = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert [list(r.token_ids) for r in got] == [[1], [2, 3], [4]]
    assert [r.text for r in got] == [" the", " cat sat", " on"]
    assert got[-1].finish_reason == "length" and got[-1].usage.completion_tokens == 4
