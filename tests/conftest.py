"""Shared fixtures. Heavy ones (the HF reference model, a running cluster) are session-scoped:
one of each per test run."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Prompts for parity checks: chat-formatted and raw, short and long.
PARITY_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a paged KV cache is in one paragraph.",
    "List three prime numbers.",
    "The quick brown fox",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "Translate to French: I like apples.",
]


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where a CUDA device is present."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from cluster.models import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """HF transformers' own model and tokenizer from the same GGUF file (float32, CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(smollm2_path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval(), tokenizer


@pytest.fixture(scope="session")
def local_cluster():
    """The embedded default (configs/local.yaml) on a local Ray, any free port."""
    from cluster.config import load_config
    from cluster.launcher import Cluster

    config = load_config(
        os.path.join(REPO, "configs", "local.yaml"),
        ["server.port=0", "cluster.num_cpus=2", "cache.cpu_cache_gb=0.5"],
    )
    cluster = Cluster(config)
    cluster.start()
    yield cluster
    cluster.shutdown()
