import asyncio
import threading

from scheduler.engine import Delta
from scheduler.logprobs import Logprob
from scheduler.outbox import Outbox


def test_deltas_arrive_in_order_with_one_wakeup_per_burst():
    async def main() -> tuple[list[list[int]], int]:
        loop = asyncio.get_running_loop()
        outbox = Outbox(loop)
        flushes = 0
        flush = outbox._flush

        def counted() -> None:
            nonlocal flushes
            flushes += 1
            flush()

        outbox._flush = counted
        queues = [asyncio.Queue() for _ in range(3)]
        sinks = [outbox.sink(q) for q in queues]

        def engine_step() -> None:  # one step: 100 deltas for each of the three requests
            for i in range(100):
                for sink in sinks:
                    sink(Delta("r", [i], str(i)))

        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join(timeout=10)  # blocks the loop: the whole step is posted before any flush
        got = [[(await q.get()).token_ids[0] for _ in range(100)] for q in queues]
        return got, flushes

    got, flushes = asyncio.run(main())
    assert got == [list(range(100))] * 3
    assert flushes == 1  # one wakeup for the step's 300 deltas


def test_then_joins_two_deltas_of_a_completion():
    first = Delta("r", [1, 2], "ab", logprobs=[{1: Logprob(-0.5, 1)}, {2: Logprob(-1.0, 1)}])
    last = Delta(
        "r",
        [3],
        "c",
        finish_reason="stop",
        logprobs=[{3: Logprob(-2.0, 2)}],
        cumulative_logprob=-3.5,
        stop_reason=3,
    )
    joined = first.then(last)
    assert (joined.token_ids, joined.text, joined.finish_reason) == ([1, 2, 3], "abc", "stop")
    assert [next(iter(p)) for p in joined.logprobs] == [1, 2, 3]
    assert (joined.cumulative_logprob, joined.stop_reason) == (-3.5, 3)
    assert Delta("r", [1], "a").then(Delta("r", [2], "b")).logprobs is None
