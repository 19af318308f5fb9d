"""Shared fixtures. Heavy ones (the HF reference model, a running cluster) are session-scoped:
one of each per test run."""

import os
import socket

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

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
    return hf_gguf_model(smollm2_path)


def hf_gguf_model(path: str):
    """(HF transformers' model in float32 on the CPU, its tokenizer) from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval(), tokenizer


def running_cluster(config):
    """A fixture's body: a Cluster of config, started, yielded, then shut down."""
    from cluster.launcher import Cluster

    cluster = Cluster(config)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _cluster(overrides: list[str]):
    """configs/local.yaml with overrides, started on a local Ray (any free port), then stopped."""
    from cluster.config import load_config

    config = load_config(
        os.path.join(REPO, "configs", "local.yaml"),
        ["server.port=0", "server.http_port=0", "cluster.num_cpus=2", *overrides],
    )
    yield from running_cluster(config)


@pytest.fixture(scope="session")
def local_cluster():
    """The embedded default (configs/local.yaml) on a local Ray, any free port."""
    yield from _cluster(["cache.cpu_cache_gb=0.5"])


@pytest.fixture(scope="session")
def small_cluster():
    """The embedded default squeezed, for preemption, swapping and chunked prefill: a KV cache
    of 20 blocks (320 tokens), 32 tokens a step, and swap space for 29 blocks."""
    yield from _cluster(
        [
            "cache.num_blocks=20",
            "model.max_model_len=320",
            "scheduler.max_num_batched_tokens=32",
            "cache.swap_space_gb=0.02",
        ]
    )


def tiny_hf_config(arch: str):
    """A tiny random config of each supported architecture (vocab 256, 2 layers)."""
    import transformers as tf

    common = {"vocab_size": 256, "num_hidden_layers": 2, "max_position_embeddings": 256}
    llama_like = {**common, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    if arch == "llama":  # GQA 4:2, untied
        return tf.LlamaConfig(**llama_like, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "llama3":  # Llama-3 rope scaling, tied
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return tf.LlamaConfig(
            **llama_like, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=rope
        )
    if arch == "llama_uneven":  # 9 query / 3 KV heads, as SmolLM2: 2 ranks hold 1 + 2 KV heads
        return tf.LlamaConfig(
            **{**llama_like, "hidden_size": 72, "num_attention_heads": 9}, num_key_value_heads=3
        )
    if arch == "mistral":  # one KV head: fewer KV heads than tensor-parallel ranks
        return tf.MistralConfig(**llama_like, num_key_value_heads=1, sliding_window=None)
    if arch == "qwen2":  # QKV bias, tied
        return tf.Qwen2Config(**llama_like, num_key_value_heads=2, tie_word_embeddings=True)
    if arch == "opt":  # the embedding narrower than the hidden size: project_in / project_out
        return tf.OPTConfig(
            vocab_size=256,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=32,
        )
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    raise ValueError(arch)


TINY_ARCHS = ["llama", "llama3", "llama_uneven", "mistral", "qwen2", "opt", "gpt2"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (directory saved by HF transformers, the HF model itself)."""
    from transformers import AutoModelForCausalLM

    models = {}
    for arch in TINY_ARCHS:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_hf_config(arch)).eval()
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        models[arch] = (path, model)
    return models


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF transformers' own greedy continuation: exactly n tokens, every prompt token attended
    (an explicit mask: HF would mask tokens equal to its pad token)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (where a spawned group's rank 0 listens, or where a
    test wants nothing to listen)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
