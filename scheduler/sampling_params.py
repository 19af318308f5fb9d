import enum
from dataclasses import dataclass, field

from protos import serving_pb2

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
WIRE_NO_MAX_TOKENS = -1  # max_tokens on the wire for None: up to max_model_len (unset: 16)


class RequestOutputKind(enum.IntEnum):
    """What the client is sent of each completion (vLLM's names; values are serving.proto's)."""

    DELTA = serving_pb2.DELTA  # after every step, what it added
    FINAL_ONLY = serving_pb2.FINAL_ONLY  # once, at its end, everything (vLLM's offline LLM)


@dataclass
class SamplingParams:
    """How to sample one request; vLLM's names, meanings and defaults.

    Checked on construction: a bad value raises ValueError with a sentence naming the field.
    """

    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # in (0, 1]; 1 = off
    top_k: int = 0  # 0 or -1 = off
    max_tokens: int | None = 16  # None = up to max_model_len
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    n: int = 1  # completions of the prompt; completion i samples with seed + i when seeded
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    presence_penalty: float = 0.0  # - p for each token already in the output
    frequency_penalty: float = 0.0  # - f x its count in the output
    repetition_penalty: float = 1.0  # prompt and output tokens: logit / r if > 0, else x r
    min_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens
    # Stop strings: the text ends before the first one found (matched across token boundaries;
    # checked once min_tokens are out); include_stop_str_in_output keeps it in the text.
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None = none; k = the sampled token's logprob and the top k
    output_kind: RequestOutputKind = RequestOutputKind.DELTA

    def __post_init__(self) -> None:
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise ValueError(
                f"output_kind must be one of {[k.name for k in RequestOutputKind]}, "
                f"got {self.output_kind!r}"
            ) from None
        if self.top_k == -1:
            self.top_k = 0
        self.stop_token_ids = list(self.stop_token_ids)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        if any(not s for s in self.stop):
            raise ValueError("stop must not contain an empty string")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative, got {self.stop_token_ids}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.min_tokens < 0 or (
            self.max_tokens is not None and self.min_tokens > self.max_tokens
        ):
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    def to_proto(self) -> serving_pb2.SamplingParams:
        """The wire form; fields left unset where the value is None."""
        msg = serving_pb2.SamplingParams()
        for name in _WIRE_OPTIONAL:
            if (value := getattr(self, name)) is not None:
                setattr(msg, name, value)
        for name in _WIRE_PLAIN:
            setattr(msg, name, getattr(self, name))
        for name in _WIRE_REPEATED:
            getattr(msg, name).extend(getattr(self, name))
        if self.max_tokens is None:
            msg.max_tokens = WIRE_NO_MAX_TOKENS
        return msg

    @classmethod
    def from_proto(cls, msg: serving_pb2.SamplingParams) -> "SamplingParams":
        """Checked like any construction: unset optional fields take this class's defaults."""
        values = {name: getattr(msg, name) for name in _WIRE_OPTIONAL if msg.HasField(name)}
        values.update((name, getattr(msg, name)) for name in _WIRE_PLAIN)
        values.update((name, list(getattr(msg, name))) for name in _WIRE_REPEATED)
        if values.get("max_tokens") == WIRE_NO_MAX_TOKENS:
            values["max_tokens"] = None
        return cls(**values)


# Every field, by how serving.proto carries it: `optional` (unset = the default), a plain proto3
# scalar (whose zero is the default), or repeated.
_WIRE_OPTIONAL = (
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "seed",
    "skip_special_tokens",
    "n",
    "repetition_penalty",
    "logprobs",
)
_WIRE_PLAIN = (
    "ignore_eos",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "min_tokens",
    "include_stop_str_in_output",
    "output_kind",
)
_WIRE_REPEATED = ("stop_token_ids", "stop")
