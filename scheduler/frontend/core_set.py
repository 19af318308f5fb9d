"""A frontend's engine cores: one CoreClient (one Connect stream) each, every new request routed
to one of them. Several engine cores are data parallelism across processes: each core drives
its own replicas' step loops under its own interpreter lock.

    add(AddRequest) --route--> core i, among those ready and serving and within a load bound of
                               the least loaded (this frontend's unfinished requests on each):
                               the one it sent the longest prefix of the prompt before
                               (PrefixIndex), then the least loaded, then the lowest index
    abort(id), stop(id, ...) --> the core that holds the request
    abort_by_id, server_info --> every core (found anywhere; the replicas merged)
    scale(n)                 --> every core, to its share of n (split_evenly: n >= cores)

Core i's replica r shows as replica r * (number of cores) + i, so ids stay distinct.

With one core it behaves as that core's CoreClient. A core whose stream breaks ends its own
requests (CORE_GONE: CoreBackend sends those that sent their client nothing yet to another core)
and takes no new one; the others keep serving.
"""

import asyncio
from collections.abc import Callable, Sequence

import grpc

from protos import frontend_pb2, serving_pb2
from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.config import split_evenly
from scheduler.core.router import BALANCE_SLACK
from scheduler.frontend.backend import ServingError
from scheduler.frontend.core_client import CORE_GONE, CoreClient, serving_changes
from scheduler.frontend.prefix_index import PrefixIndex


class CoreSet:
    """Create and use it on one event loop; start() opens every core's stream."""

    def __init__(
        self,
        addresses: Sequence[str],
        on_ready: Callable[[serving_pb2.ModelInfoResponse], None],
        secret: str | None = None,
        heartbeat: Heartbeat = HEARTBEAT,
    ) -> None:
        """on_ready(model info) is called once, when the first core is ready (every core
        serves the same model). secret, heartbeat: as CoreClient's."""
        if isinstance(addresses, str) or not addresses:
            raise ValueError(f"a frontend needs a list of engine-core addresses, got {addresses!r}")
        self._on_ready = on_ready
        self._ready: list[bool] = [False] * len(addresses)
        self.cores = [
            CoreClient(address, self._ready_callback(i), secret, heartbeat)
            for i, address in enumerate(addresses)
        ]
        self.closed = asyncio.Event()  # set once every core's stream has ended
        # Set whenever `serving` may have changed (a core's serving, or its stream's end);
        # cleared by the server that watches it, which re-reads `serving`.
        self.serving_changed = asyncio.Event()
        self._watchers: list[asyncio.Task] = []
        self._prefixes = PrefixIndex(len(addresses))

    def _ready_callback(self, i: int) -> Callable[[serving_pb2.ModelInfoResponse], None]:
        def ready(info: serving_pb2.ModelInfoResponse) -> None:
            if not any(self._ready):
                self._on_ready(info)
            self._ready[i] = True
            self.serving_changed.set()

        return ready

    async def start(self, frontend_port: int = 0) -> None:
        """Opens every core's stream (frontend_port: this frontend's own Serving port)."""
        for core in self.cores:
            await core.start(frontend_port)
        self._watchers = [asyncio.ensure_future(self._watch(core)) for core in self.cores]

    async def _watch(self, core: CoreClient) -> None:
        """Passes on a core's serving changes and its stream's end."""
        async for _ in serving_changes(core.closed, core.serving_changed):
            self.serving_changed.set()
        if all(c.closed.is_set() for c in self.cores):
            self.closed.set()
        self.serving_changed.set()

    @property
    def connected(self) -> bool:
        """Some core's stream is open."""
        return any(core.connected for core in self.cores)

    @property
    def serving(self) -> bool:
        """Some core is ready, connected and serves."""
        return self.num_serving > 0

    @property
    def num_serving(self) -> int:
        """Cores ready, connected and serving: those new requests are routed over."""
        return sum(self._takes(i) for i in range(len(self.cores)))

    def _takes(self, i: int) -> bool:
        core = self.cores[i]
        return self._ready[i] and core.connected and core.serving

    @property
    def last_outputs_at(self) -> float | None:
        """time.monotonic() when the last message of outputs came from any core."""
        times = [core.last_outputs_at for core in self.cores if core.last_outputs_at is not None]
        return max(times, default=None)

    @property
    def num_requests(self) -> int:
        """Requests sent to the cores that they have not ended yet (nor refused)."""
        return sum(core.num_requests for core in self.cores)

    def add(self, msg: frontend_pb2.AddRequest, wake_at_end: bool = False) -> asyncio.Queue:
        """Sends a request to the core it is routed to; returns its queue (CoreClient.add)."""
        if any(core.holds(msg.request_id) for core in self.cores):
            raise ServingError(
                grpc.StatusCode.ALREADY_EXISTS, f"request_id {msg.request_id!r} is already in use"
            )
        return self._route(msg.prompt_token_ids).add(msg, wake_at_end)

    def _route(self, prompt: Sequence[int]) -> CoreClient:
        if len(self.cores) == 1:
            return self.cores[0]
        takers = [i for i in range(len(self.cores)) if self._takes(i)]
        if not takers:  # none serves: a core whose replicas recover holds it until one does
            takers = [i for i, core in enumerate(self.cores) if self._ready[i] and core.connected]
        if not takers:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, CORE_GONE)
        # As the core's Router among its replicas: a prefix counts among the cores loaded at
        # most BALANCE_SLACK requests (or half the least's load) above the least loaded.
        loads = {i: self.cores[i].num_requests for i in takers}
        least = min(loads.values())
        bound = least + max(BALANCE_SLACK, least // 2)
        hashes = PrefixIndex.hashes(prompt)
        best = max(
            (i for i in takers if loads[i] <= bound),
            key=lambda i: (self._prefixes.matched(i, hashes), -loads[i], -i),
        )
        self._prefixes.record(best, hashes)
        return self.cores[best]

    def _holder(self, request_id: str) -> CoreClient | None:
        return next((core for core in self.cores if core.holds(request_id)), None)

    def abort(self, request_id: str) -> None:
        """Asks the core holding the request to end every completion of it."""
        core = self._holder(request_id)
        if core is not None:
            core.abort(request_id)

    def stop(self, request_id: str, index: int, stop_str: str) -> None:
        """Tells the core holding the request that a completion reached a stop string."""
        core = self._holder(request_id)
        if core is not None:
            core.stop(request_id, index, stop_str)

    async def abort_by_id(self, request_id: str, owner: str) -> bool:
        """Abort of the Serving API, for a request of owner ("" = any) on any frontend and
        any core."""
        live = [core for core in self.cores if core.connected]
        if not live:
            raise ServingError(grpc.StatusCode.UNAVAILABLE, CORE_GONE)
        found = await asyncio.gather(*(core.abort_by_id(request_id, owner) for core in live))
        return any(found)

    async def server_info(self) -> serving_pb2.ServerInfoResponse:
        """Every core's state in one answer: counters summed, replicas listed (ids as above),
        each frontend once (its requests on every core summed)."""
        if len(self.cores) == 1:
            return await self.cores[0].server_info()
        count = len(self.cores)
        merged = serving_pb2.ServerInfoResponse()
        frontends: dict[int, serving_pb2.FrontendInfo] = {}
        live = [i for i, core in enumerate(self.cores) if core.connected]
        infos = await asyncio.gather(*(self.cores[i].server_info() for i in live))
        for i, info in zip(live, infos, strict=True):
            merged.model = info.model
            merged.throughput_window_s = info.throughput_window_s
            for replica in info.replicas:
                replica.replica_id = replica.replica_id * count + i
            merged.replicas.extend(info.replicas)
            merged.nodes.extend(n for n in info.nodes if n not in merged.nodes)
            for frontend in info.frontends:
                seen = frontends.setdefault(
                    frontend.pid, serving_pb2.FrontendInfo(pid=frontend.pid, port=frontend.port)
                )
                seen.num_requests += frontend.num_requests
                seen.num_unfinished += frontend.num_unfinished
            merged.num_steps += info.num_steps
            merged.num_finished_requests += info.num_finished_requests
            merged.num_generated_tokens += info.num_generated_tokens
            merged.generated_tokens_per_s += info.generated_tokens_per_s
            merged.num_replica_failures += info.num_replica_failures
            merged.num_recovered_requests += info.num_recovered_requests
            merged.num_graph_steps += info.num_graph_steps
            merged.num_piecewise_steps += info.num_piecewise_steps
            merged.step_seconds += info.step_seconds
        merged.frontends.extend(frontends.values())
        return merged

    async def scale(self, replicas: int) -> serving_pb2.ScaleResponse:
        """Splits the replicas over the cores as the config does (each core keeps at least one)
        and has each scale to its share; a core that fails answers for all (the others'
        changes stand, as those of a core placed before a failed replica do)."""
        count = len(self.cores)
        if count == 1:
            return await self.cores[0].scale(replicas)
        if replicas < count:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server runs {count} engine cores, each with at least one replica; "
                f"Scale to at least {count} replicas, not {replicas}",
            )
        shares = split_evenly(replicas, count)
        answers = await asyncio.gather(
            *(core.scale(n) for core, n in zip(self.cores, shares, strict=True))
        )
        merged = serving_pb2.ScaleResponse()
        for i, answer in enumerate(answers):
            merged.serving.extend(r * count + i for r in answer.serving)
            merged.added.extend(r * count + i for r in answer.added)
            merged.draining.extend(r * count + i for r in answer.draining)
            merged.num_draining_requests += answer.num_draining_requests
        for ids in (merged.serving, merged.added, merged.draining):
            ids.sort()
        return merged

    async def close(self) -> None:
        """Ends every core's stream (each core aborts what this frontend still holds)."""
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*(core.close() for core in self.cores))
        self.closed.set()
