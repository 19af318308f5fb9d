"""The sections of the YAML config the scheduler reads: frozen, checked on construction.

cluster/config.py composes these with the cluster-only sections and loads them from YAML.
"""

import math
import os
from dataclasses import dataclass, field, replace

_LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICES = ("auto", "cuda", "cpu")


INT32_MAX = 2**31 - 1  # what the protos' int32 fields (and gRPC's int options) carry
UINT64_MAX = 2**64 - 1  # seeds: torch generators and the protos' uint64


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {', '.join(allowed)}, got {value!r}")


def check_int_range(field: str, value: int | None, low: int, high: int = INT32_MAX) -> None:
    """A ValueError naming field unless value (when set) is in [low, high]."""
    if value is not None and not low <= value <= high:
        raise ValueError(f"{field} must be in [{low}, {high}], got {value}")


def split_evenly(total: int, parts: int) -> list[int]:
    """total split into parts counts as even as can be, the first ones one more."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def check_positive_float(field: str, value: float, allow_zero: bool = False) -> None:
    """A ValueError naming field unless value is finite and > 0 (or >= 0 with allow_zero)."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond any float
        finite = False
    if not (finite and (value >= 0 if allow_zero else value > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{field} must be a finite number {bound}, got {value}")


@dataclass(frozen=True)
class ModelConfig:
    model: str = "smollm2-135m-instruct"  # a named model, a .gguf file or an HF directory
    tokenizer: str | None = None  # a named model, .gguf or HF directory; None = the model's
    load_format: str = "auto"
    dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 on CPU
    device: str = "auto"
    max_model_len: int | None = None  # None = the model's own context length
    seed: int = 0
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs, every step runs eagerly

    def __post_init__(self) -> None:
        _check_choice("model.load_format", self.load_format, _LOAD_FORMATS)
        _check_choice("model.dtype", self.dtype, _DTYPES)
        _check_choice("model.device", self.device, _DEVICES)
        check_int_range("model.max_model_len", self.max_model_len, 2)
        check_int_range("model.seed", self.seed, 0, UINT64_MAX)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of the card for weights + activations + KV
    cpu_cache_gb: float = 1.0  # CPU: KV cache size
    num_blocks: int | None = None  # overrides the profiled figure
    enable_prefix_caching: bool = True  # full blocks are shared by hash and kept after use
    swap_space_gb: float = 0.0  # host memory per rank for preempted requests' blocks; 0 = off

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(
                f"cache.block_size must be 8, 16, 32, 64 or 128, got {self.block_size}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"cache.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        check_positive_float("cache.cpu_cache_gb", self.cpu_cache_gb)
        check_int_range("cache.num_blocks", self.num_blocks, 1)
        check_positive_float("cache.swap_space_gb", self.swap_space_gb, allow_zero=True)


POLICIES = ("fcfs", "priority", "cache_aware")

# (max_num_seqs, max_num_batched_tokens) by the workers' device when the config leaves them
# unset. GPU: vLLM's offline defaults for large cards are 1024 and 16384; 512 keeps the decode
# graph ladder (captured up to max_num_seqs) at vLLM's own largest captured size.
DEVICE_DEFAULTS = {"gpu": (512, 16384), "cpu": (256, 2048)}


@dataclass(frozen=True)
class SchedulerConfig:
    # Requests in one step, and tokens in one step (prefill chunks + decodes). None: the
    # device's default (for_device), as vLLM sizes its defaults by the card: larger batches
    # are what a GPU's throughput needs, a CPU's steps stay short.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    # Which waiting request goes first: fcfs (arrival), priority (the request's priority, lower
    # first, then arrival) or cache_aware (longest cached prefix, then arrival).
    policy: str = "fcfs"
    # cache_aware: a request passed over in this many steps by later arrivals goes first.
    max_steps_passed_over: int = 16
    # Plan step N+1 and send it before step N's tokens are learned (two steps in flight): the
    # device need not wait for planning, transport and detokenization. A request that stops
    # costs at most one more sampled token, discarded. False: one step in flight.
    async_scheduling: bool = True
    # Requests waiting in the engine core to be scheduled, all replicas and frontends together
    # (SGLang's max_queued_requests): a new request beyond it is refused RESOURCE_EXHAUSTED
    # before anything is built for it. 0 = no limit.
    max_queued_requests: int = 0
    # The step watchdog: a step the workers have not answered this many seconds after it
    # became the oldest in flight fails its replica (a hung worker: a stuck kernel, a deadlocked
    # collective), which is then recovered as a dead one. No legitimate step comes near the
    # default: the largest, a full max_num_batched_tokens prefill, took 21 s on the 2-core CPU
    # box (SmolLM2-135M, 2048 tokens, float32) and takes well under a second on a GPU, where a
    # first-time Triton compile adds a few; model loading, profiling and graph capture all end
    # before the first step. CPU serving of larger models needs a larger bound. A stopped or
    # vanished worker process is found sooner, by the worker channels' keepalive.
    step_timeout_s: float = 120.0
    # A request with more tokens than this left to compute (a long prompt) computes at most this
    # many a step (vLLM's long_prefill_token_threshold): its prefill spreads over more steps,
    # each shorter, so the requests decoding beside it keep a steadier pace (and on a GPU the
    # steps stay within the CUDA graphs' rows, model_runner.GRAPH_PROMPT_ROWS). 0 = no cap.
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        _check_choice("scheduler.policy", self.policy, POLICIES)
        check_int_range(
            "scheduler.long_prefill_token_threshold", self.long_prefill_token_threshold, 0
        )
        check_int_range("scheduler.max_steps_passed_over", self.max_steps_passed_over, 0)
        check_int_range("scheduler.max_num_seqs", self.max_num_seqs, 1)
        check_int_range("scheduler.max_num_batched_tokens", self.max_num_batched_tokens, 1)
        check_int_range("scheduler.max_queued_requests", self.max_queued_requests, 0)
        check_positive_float("scheduler.step_timeout_s", self.step_timeout_s)

    def for_device(self, gpu: bool) -> "SchedulerConfig":
        """This config with the unset sizes filled for the workers' device: DEVICE_DEFAULTS."""
        seqs, tokens = DEVICE_DEFAULTS["gpu" if gpu else "cpu"]
        return replace(
            self,
            max_num_seqs=self.max_num_seqs or seqs,
            max_num_batched_tokens=self.max_num_batched_tokens or tokens,
        )


_MAX_FRONTENDS = 64  # processes on the head node, one event loop each


def default_frontends() -> int:
    """Frontend processes for this machine: one per 4 cores, at least 1, at most 8 (a streamed
    token costs a frontend ~0.1 ms of CPU: BENCHMARKS.md "Frontend streaming")."""
    return min(8, max(1, (os.cpu_count() or 1) // 4))


@dataclass(frozen=True)
class ServerConfig:
    """The Serving endpoint. Files are read where the frontends run (the head node)."""

    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (the frontends share the one the first is given)
    # The OpenAI-compatible HTTP API (on host, with the same TLS and tokens); every frontend
    # process listens on it (SO_REUSEPORT). 0 = any free port (shared as port is).
    http_port: int = 8000
    # Frontend processes serving clients on the ports (SO_REUSEPORT): each validates, tokenizes,
    # detokenizes and streams its clients' requests; the engine core sees token ids only.
    frontends: int = field(default_factory=default_frontends)
    # TLS: the server's certificate chain and private key (PEM), both or neither. With
    # tls_client_ca_file, clients must also present a certificate signed by that CA (mTLS).
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    # Bearer tokens: when any is set, every call but the health check must carry the metadata
    # "authorization: Bearer <token>", or is refused UNAUTHENTICATED.
    auth_tokens: tuple[str, ...] = ()
    auth_tokens_file: str | None = None  # one token per line, added to auth_tokens
    # Tokens of the admin role: they also serve as client tokens, and admin calls (Scale) take
    # no other. Distinct from auth_tokens. With no token of either kind, every call is open.
    admin_tokens: tuple[str, ...] = ()
    # Limits: requests each frontend holds admitted and unfinished, from admission until the
    # core has ended them (RESOURCE_EXHAUSTED, HTTP 429, beyond; 0 = no limit), and the largest
    # request message accepted, in bytes.
    max_concurrent_requests: int = 0
    max_request_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "auth_tokens", tuple(self.auth_tokens))
        object.__setattr__(self, "admin_tokens", tuple(self.admin_tokens))
        for key in ("port", "http_port"):
            if not 0 <= getattr(self, key) < 65536:
                raise ValueError(f"server.{key} must be in [0, 65535], got {getattr(self, key)}")
        if self.port and self.port == self.http_port:
            raise ValueError(
                f"server.http_port must differ from server.port (both {self.port}): the gRPC "
                "and the HTTP servers each listen on a port of their own"
            )
        check_int_range("server.frontends", self.frontends, 1, _MAX_FRONTENDS)
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server.tls_cert_file and server.tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("server.tls_client_ca_file needs server.tls_cert_file (TLS)")
        for key in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "auth_tokens_file"):
            path = getattr(self, key)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"server.{key}: no such file {path!r}")
        for key in ("auth_tokens", "admin_tokens"):
            if any(not t or any(c.isspace() for c in t) for t in getattr(self, key)):
                raise ValueError(f"server.{key} must be non-empty strings without whitespace")
        if set(self.auth_tokens) & set(self.admin_tokens):
            raise ValueError("server.admin_tokens must differ from server.auth_tokens")
        if self.auth_tokens_file is not None:
            try:
                file_tokens = self._file_tokens()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"server.auth_tokens_file: cannot read it: {e}") from None
            if set(self.admin_tokens) & file_tokens:
                raise ValueError(
                    "server.admin_tokens must differ from the tokens of server.auth_tokens_file"
                )
        check_int_range("server.max_concurrent_requests", self.max_concurrent_requests, 0)
        check_int_range("server.max_request_bytes", self.max_request_bytes, 1024)

    def tokens(self) -> frozenset[str]:
        """Every accepted token: auth_tokens, the lines of auth_tokens_file and admin_tokens."""
        tokens = set(self.auth_tokens) | set(self.admin_tokens)
        if self.auth_tokens_file is not None:
            tokens |= self._file_tokens()
        return frozenset(tokens)

    def _file_tokens(self) -> set[str]:
        """The tokens of auth_tokens_file, one a line."""
        with open(self.auth_tokens_file) as f:
            return {line.strip() for line in f if line.strip()}

    def read(self, key: str) -> bytes | None:
        """The bytes of a file setting (tls_cert_file, ...), or None when unset."""
        path = getattr(self, key)
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()
