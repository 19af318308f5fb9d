"""An engine core in this process over one fake rank (no model), for frontend tests."""

import contextlib
from collections.abc import Iterator

from scheduler.config import CacheConfig, ModelConfig, SchedulerConfig
from scheduler.engine_core import EngineCore
from scheduler.replica import EngineConfigs, ReplicaSpec
from tests.scheduler.fake_worker import FakeRank, serving

BLOCK_SIZE = 8
NUM_BLOCKS = 64
MAX_MODEL_LEN = 64


@contextlib.contextmanager
def running_core(rank: FakeRank) -> Iterator[EngineCore]:
    """An EngineCore serving one replica of the rank (its cache: NUM_BLOCKS x BLOCK_SIZE)."""
    with serving(rank) as address:
        core = EngineCore("fake")
        try:
            core.start(
                [ReplicaSpec((address,), "fake-model")],
                EngineConfigs(
                    ModelConfig(max_model_len=MAX_MODEL_LEN),
                    CacheConfig(block_size=BLOCK_SIZE, num_blocks=NUM_BLOCKS),
                    SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64),
                ),
            )
            yield core
        finally:
            core.stop()


def blocks_in_use(core: EngineCore) -> int:
    """KV blocks held by requests (free blocks may still cache a prefix)."""
    [replica] = core.fleet.server_info().replicas
    return replica.num_blocks - replica.num_free_blocks


def fake_rank() -> FakeRank:
    return FakeRank(NUM_BLOCKS, block_size=BLOCK_SIZE)
