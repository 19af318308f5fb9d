"""An engine core in this process over one fake rank (no model), and a tokenizer of its
vocabulary, for frontend tests."""

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator

from protos.heartbeat import HEARTBEAT, Heartbeat
from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig, ServerConfig
from scheduler.core.engine_core import EngineCore
from scheduler.core.replica import EngineConfigs, ReplicaSpec
from scheduler.frontend.server import FrontendServer
from tests.scheduler.fake_worker import TIMEOUT, FakeRank, serving

BLOCK_SIZE = 8
NUM_BLOCKS = 64
MAX_MODEL_LEN = 64
ENGINE_CONFIGS = EngineConfigs(
    ModelConfig(max_model_len=MAX_MODEL_LEN),
    CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
    SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
)
PIECES = ["<eos>", " the", " cat", " sat", " on", " a", " mat", ".", "\n", "\n"]


class PieceTokenizer:
    """Token i is PIECES[i] (the fake rank's vocabulary); 0 is EOS. Text encodes one token per
    character (never EOS); the chat template takes system, user and assistant turns."""

    eos_token_ids = frozenset([0])
    roles = ("system", "user", "assistant")

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 9 + 1 for c in text]

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        for m in messages:
            if m["role"] not in self.roles:
                raise ValueError(f"messages: the chat template has no role {m['role']!r}")
        return self.encode("".join(f"{m['role']}:{m['content']}\n" for m in messages))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in token_ids)

    def decode_stream(self, skip_special_tokens: bool) -> None:
        return None  # streamed text comes from decode() of windows


@contextlib.contextmanager
def running_core(
    rank: FakeRank,
    secret: str | None = None,
    heartbeat: Heartbeat = HEARTBEAT,
    on_hung: Callable[[int], None] | None = None,
    **scheduler,
) -> Iterator[EngineCore]:
    """An EngineCore serving one replica of the rank (its cache: NUM_BLOCKS x BLOCK_SIZE);
    scheduler: SchedulerConfig fields over the fixture's (8 sequences, 64 tokens a step);
    secret: the cluster secret it demands of every call; heartbeat and on_hung: how it
    watches its frontends (EngineCore)."""
    with serving(rank) as address:
        core = EngineCore("fake", secret=secret, heartbeat=heartbeat, on_hung=on_hung)
        try:
            configs = dataclasses.replace(
                ENGINE_CONFIGS,
                scheduler=dataclasses.replace(ENGINE_CONFIGS.scheduler, **scheduler),
            )
            core.start([ReplicaSpec((address,), "fake-model")], configs)
            yield core
        finally:
            core.stop()


@contextlib.contextmanager
def running_frontend(
    core: EngineCore,
    metrics_dir: str,
    config: ServerConfig | None = None,
    core_secret: str | None = None,
) -> Iterator[FrontendServer]:
    """A frontend server in front of the core, serving (PieceTokenizer); config's ports are 0
    (free ones); core_secret: the one the core demands."""
    config = config or ServerConfig(port=0, http_port=0)
    frontend = FrontendServer(
        config, [core.address], PieceTokenizer, "fake", metrics_dir, core_secret
    )
    try:
        frontend.wait_ready(TIMEOUT)
        yield frontend
    finally:
        frontend.stop()


def blocks_in_use(core: EngineCore) -> int:
    """KV blocks held by requests (free blocks may still cache a prefix)."""
    [replica] = core.fleet.server_info().replicas
    return replica.num_blocks - replica.num_free_blocks


def fake_rank() -> FakeRank:
    return FakeRank(NUM_BLOCKS, block_size=BLOCK_SIZE)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Polls condition (state of another thread with no event to wait on) until TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)
