"""The YAML config: frozen sections, checked on load. An unknown key, a wrong type or a bad value
is an error naming the file and the key.

    cluster:    address (null = embedded local Ray), namespace, num_cpus, placement_strategy,
                startup_timeout_s
    parallel:   tensor_parallel_size, replicas
    model:      scheduler.config.ModelConfig
    cache:      scheduler.config.CacheConfig
    scheduler:  scheduler.config.SchedulerConfig
    server:     scheduler.config.ServerConfig
    logging:    level
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from scheduler.config import (
    CacheConfig,
    ModelConfig,
    SchedulerConfig,
    ServerConfig,
    check_int_range,
    check_positive_float,
    split_evenly,
)

PLACEMENT_STRATEGIES = ("STRICT_PACK", "PACK")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class ClusterSection:
    address: str | None = None  # a Ray address ("auto", "ray://host:10001"); None = embedded
    namespace: str = "pagedserve"
    num_cpus: int | None = None  # CPUs of an embedded Ray; None = Ray's own count
    # How a replica's workers are placed: STRICT_PACK keeps them on one node, PACK prefers to.
    placement_strategy: str = "STRICT_PACK"
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"cluster.placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)}, "
                f"got {self.placement_strategy!r}"
            )
        check_positive_float("cluster.startup_timeout_s", self.startup_timeout_s)
        check_int_range("cluster.num_cpus", self.num_cpus, 0)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1  # ranks (GPUs) of one replica
    replicas: int = 1  # tensor-parallel groups, each with its own KV cache, one scheduler
    # Engine-core processes the replicas are split over (each drives its replicas' step loops
    # under its own interpreter lock; the frontends route requests over them, CoreSet).
    engine_cores: int = 1

    def __post_init__(self) -> None:
        check_int_range("parallel.tensor_parallel_size", self.tensor_parallel_size, 1)
        check_int_range("parallel.replicas", self.replicas, 1)
        check_int_range("parallel.engine_cores", self.engine_cores, 1)
        if self.engine_cores > self.replicas:
            raise ValueError(
                f"parallel.engine_cores={self.engine_cores} exceeds parallel.replicas="
                f"{self.replicas}: each engine core drives at least one replica"
            )

    def split(self) -> list[int]:
        """Replicas of each engine core: as even as can be, the first ones one more."""
        return split_evenly(self.replicas, self.engine_cores)


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"  # of the driver and of every actor

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ValueError(
                f"logging.level must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}"
            )


@dataclass(frozen=True)
class Config:
    cluster: ClusterSection = field(default_factory=ClusterSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        """What no section can check alone (cluster.preflight checks what needs the model)."""
        model, cache = self.model, self.cache
        if model.max_model_len is not None and cache.num_blocks is not None:
            capacity = cache.num_blocks * cache.block_size
            if model.max_model_len > capacity:
                raise ValueError(
                    f"model.max_model_len={model.max_model_len} does not fit the KV cache: "
                    f"cache.num_blocks={cache.num_blocks} x cache.block_size={cache.block_size}"
                    f" = {capacity} tokens; lower model.max_model_len or raise cache.num_blocks"
                )


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Reads a YAML file (or the defaults when path is None), then applies `section.key=value`
    overrides (values parsed as YAML)."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{source}: cannot read the config: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        raw[section][name] = yaml.safe_load(value)
    return config_from_dict(raw, source)


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Config:
    sections = {f.name: f for f in dataclasses.fields(Config)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(
                f"{source}: unknown section {name!r} (allowed: {', '.join(sections)})"
            )
        built[name] = _build_section(sections[name].default_factory, name, values or {}, source)
    try:
        return Config(**built)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from e


def _build_section(cls: type, section: str, values: Any, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: section {section!r} must be a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {section}.{key} (allowed in {section}: {', '.join(fields)})"
            )
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{source}: {section}.{key} must be {_type_name(hints[key])}, got {value!r}"
            )
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from e


def _type_ok(value: Any, hint: Any) -> bool:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:  # tuple[T, ...]: a YAML list of T
        item = typing.get_args(hint)[0]
        return isinstance(value, list | tuple) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return "null" if hint is type(None) else hint.__name__
