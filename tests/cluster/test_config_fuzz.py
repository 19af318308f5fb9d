"""Property-based fuzzing of the YAML loader: random files of the config's sections and keys
(and unknown ones) with values of every YAML type, extreme numbers included, give a Config or a
ConfigError naming the file, never another exception; and a Config that loads fits the
messages the core sends the workers (no value passes the loader to fail there). Deterministic
and bounded."""

import dataclasses
import math
import types
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import Config, ConfigError, load_config
from protos import serving_pb2, worker_pb2

SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
KEYS = {name: typing.get_type_hints(cls) for name, cls in SECTIONS.items()}

INTS = st.one_of(
    st.integers(-3, 300),
    st.sampled_from([0, 1, 1024, 2**31 - 1, 2**31, 2**63, 2**64 - 1, 2**64, 10**400, -(2**63)]),
    st.integers(),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.5, 1.0, 1e-300, 1e300, math.inf, -math.inf]),
    INTS,
)
TEXTS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["auto", "cpu", "fcfs", "priority", "INFO", "STRICT_PACK", "dummy", "::1"]),
)
SCALARS = st.one_of(st.none(), st.booleans(), INTS, FLOATS, TEXTS)
VALUES = st.recursive(  # anything YAML holds
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def typed(hint) -> st.SearchStrategy:
    """Values of a key's type (a YAML list for a tuple), extreme ones included."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType):
        return st.one_of(st.none(), *(typed(a) for a in args))
    if typing.get_origin(hint) is tuple:
        return st.lists(typed(args[0]), max_size=3)
    return {int: INTS, float: FLOATS, str: TEXTS, bool: st.booleans()}[hint]


@st.composite
def config_files(draw) -> dict:
    """Sections of keys with values mostly of their type; now and then an unknown section or
    key, a value of any type, or something else where a mapping belongs."""
    raw = {}
    for section in draw(st.lists(st.sampled_from([*SECTIONS] * 4 + [None]), max_size=7)):
        if section is None:
            raw[draw(st.text(max_size=8))] = draw(VALUES)
            continue
        if draw(st.integers(0, 19)) == 0:
            raw[section] = draw(SCALARS)
            continue
        values = raw[section] = {}
        hints = KEYS[section]
        for key in draw(st.lists(st.sampled_from([*hints, None]), max_size=4)):
            if key is None:
                values[draw(st.text(max_size=8))] = draw(VALUES)
            else:
                odd = draw(st.integers(0, 9)) == 0
                values[key] = draw(VALUES if odd else typed(hints[key]))
    return raw


def assert_fits_the_wire(config: Config) -> None:
    """Builds the messages the core makes of the config (a value out of a field's range raises
    ValueError) and checks what gRPC and torch take."""
    model, cache, scheduler = config.model, config.cache, config.scheduler
    worker_pb2.InitDistributedRequest(world_size=config.parallel.tensor_parallel_size)
    worker_pb2.LoadModelRequest(seed=model.seed)
    worker_pb2.ProfileMemoryRequest(max_num_batched_tokens=scheduler.max_num_batched_tokens)
    worker_pb2.InitCacheRequest(
        num_blocks=cache.num_blocks or 1,
        max_num_seqs=scheduler.max_num_seqs,
        max_model_len=model.max_model_len or 2,
    )
    serving_pb2.ScaleRequest(replicas=config.parallel.replicas)
    assert config.server.max_request_bytes <= 2**31 - 1  # gRPC's message size options are int
    assert config.cluster.num_cpus is None or config.cluster.num_cpus >= 0
    for value in (cache.cpu_cache_gb, cache.swap_space_gb, config.cluster.startup_timeout_s):
        assert math.isfinite(value)


def test_any_file_loads_or_fails_naming_itself(tmp_path):
    path = tmp_path / "fuzz.yaml"
    outcomes = set()

    @settings(
        max_examples=600,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(config_files())
    def fuzz(raw):
        path.write_text(yaml.safe_dump(raw))
        try:
            config = load_config(path)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: "), str(e)
            outcomes.add("refused")
        else:
            assert_fits_the_wire(config)
            outcomes.add("loaded")

    fuzz()
    assert outcomes == {"refused", "loaded"}
