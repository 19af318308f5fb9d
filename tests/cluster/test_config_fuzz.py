"""Property-based fuzzing of the YAML loader: random files of the config's sections and keys
(and unknown ones) with values of every YAML type, extreme numbers included, and file keys
naming real files (a tokens file among them), give a Config or a ConfigError naming the file,
never another exception; and a Config that loads fits the messages the core sends the workers
(no value passes the loader to fail there) or, checked against a model's shape before loading
(cluster.preflight), is refused naming the key. Deterministic and bounded."""

import dataclasses
import math
import sys
import types
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.config import Config, ConfigError, load_config
from cluster.preflight import ModelShape, check_before_loading
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
    st.sampled_from(
        [0.5, 1.0, 1e-300, 5e-324, 1e300, sys.float_info.max, 2.0**31, 8192.0, math.inf, -math.inf]
    ),
    INTS,
)
TEXTS = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["auto", "cpu", "fcfs", "priority", "INFO", "STRICT_PACK", "dummy", "::1"]),
)
FILE_KEYS = ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file")
FILE_TOKENS = ("auto", "client")  # the tokens file's lines: "auto" is one of TEXTS
# Models of the extremes: the smallest KV block there is, and SmolLM2's.
SHAPES = (ModelShape(256, 1, 1, 1), ModelShape(8192, 30, 3, 64))
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
def config_files(draw, files: list[str]) -> dict:
    """Sections of keys with values mostly of their type (a file key: mostly one of files);
    now and then an unknown section or key, a value of any type, or something else where a
    mapping belongs."""
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
                if key in FILE_KEYS and not odd:
                    values[key] = draw(st.sampled_from([*files, None]))
                else:
                    values[key] = draw(VALUES if odd else typed(hints[key]))
    return raw


def assert_fits_the_wire(config: Config) -> None:
    """Builds the messages the core makes of the config (a value out of a field's range raises
    ValueError) and checks what gRPC and torch take."""
    model, cache = config.model, config.cache
    scheduler = config.scheduler.for_device(gpu=True)  # the larger sizes a GPU gets
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
    if model.max_model_len is not None and cache.num_blocks is not None:
        assert model.max_model_len <= cache.num_blocks * cache.block_size
    server, client_tokens = config.server, set(config.server.auth_tokens)
    if server.auth_tokens_file is not None:
        with open(server.auth_tokens_file) as f:
            client_tokens |= {line.strip() for line in f if line.strip()}
    assert not set(server.admin_tokens) & client_tokens, "an admin token is also a client's"


def assert_fits_the_model_or_names_the_key(config: Config) -> None:
    """Against each of SHAPES: refused naming a key, or the block counts the workers would
    report for cache.cpu_cache_gb and cache.swap_space_gb fit their int32 fields."""
    cache = config.cache
    for shape in SHAPES:
        for cpu_workers in (False, True):
            try:
                check_before_loading(config, shape, cpu_workers)
            except ValueError as e:
                assert any(k in str(e) for k in ("model.", "cache.", "context length")), str(e)
                continue
            # The most blocks a rank counts: the rank of fewest KV heads.
            kv_heads = max(1, shape.num_kv_heads // config.parallel.tensor_parallel_size)
            dtype = config.model.dtype
            two_bytes = dtype in ("bfloat16", "float16") or (dtype == "auto" and not cpu_workers)
            per_block = shape.bytes_per_block(cache.block_size, kv_heads, 2 if two_bytes else 4)
            worker_pb2.ProfileMemoryResponse(
                num_blocks=int(cache.cpu_cache_gb * (1 << 30)) // per_block
            )
            worker_pb2.InitCacheRequest(
                num_cpu_blocks=int(cache.swap_space_gb * (1 << 30)) // per_block
            )


TOKENS = st.lists(st.sampled_from(FILE_TOKENS + ("admin",)), max_size=2, unique=True)
SIZES = st.one_of(st.floats(1e-6, 1e4), st.sampled_from([1e-9, 0.02, 8192.0, 2.0**40, 1e300]))


@st.composite
def plausible_files(draw, files: list[str]) -> dict:
    """Files of values each of its type and range, drawn where keys meet: the longest request
    against the cache's blocks, sizes against a model's blocks, admin against client tokens."""
    return {
        "model": {
            "max_model_len": draw(st.one_of(st.none(), st.integers(2, 10_000))),
            "dtype": draw(st.sampled_from(["auto", "float32", "bfloat16"])),
        },
        "cache": {
            "num_blocks": draw(st.one_of(st.none(), st.integers(1, 1000))),
            "block_size": draw(st.sampled_from([8, 16, 128])),
            "cpu_cache_gb": draw(SIZES),
            "swap_space_gb": draw(st.one_of(st.just(0.0), SIZES)),
        },
        "parallel": {"tensor_parallel_size": draw(st.integers(1, 8))},
        "server": {
            "auth_tokens": draw(TOKENS),
            "admin_tokens": draw(TOKENS),
            "auth_tokens_file": draw(st.sampled_from([*files, None])),
        },
    }


def load_each(path, files_of, max_examples: int) -> None:
    """Writes each drawn file to path and loads it: it is refused naming path, or it fits the
    wire and the models; both happen."""
    tokens = path.parent / "tokens.txt"
    tokens.write_text("".join(f"{t}\n" for t in FILE_TOKENS))
    outcomes = set()

    @settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(files_of([str(tokens), str(path)]))
    def fuzz(raw):
        path.write_text(yaml.safe_dump(raw))
        try:
            config = load_config(path)
        except ConfigError as e:
            assert str(e).startswith(f"{path}: "), str(e)
            outcomes.add("refused")
        else:
            assert_fits_the_wire(config)
            assert_fits_the_model_or_names_the_key(config)
            outcomes.add("loaded")

    fuzz()
    assert outcomes == {"refused", "loaded"}


def test_any_file_loads_or_fails_naming_itself(tmp_path):
    load_each(tmp_path / "fuzz.yaml", config_files, max_examples=600)


def test_files_of_keys_that_meet_load_or_fail_naming_itself(tmp_path):
    load_each(tmp_path / "plausible.yaml", plausible_files, max_examples=150)
