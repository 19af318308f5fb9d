"""The GGUF loader dequantizes to exactly the weights HF transformers loads from the file."""

import pytest
import torch

from worker.loader import gguf_hf_config, load_model


def test_gguf_weights_equal_hf(smollm2_path, hf_smollm2):
    hf, _ = hf_smollm2
    ours = load_model(smollm2_path, "auto", torch.float32, torch.device("cpu"), seed=0)
    hf_params = dict(hf.named_parameters())
    merged = {}  # our merged parameters, rebuilt from HF's separate ones, in shard order
    for name, tensor in hf_params.items():
        for fragment, (param_fragment, _) in ours.packed.items():
            if fragment in name:
                merged.setdefault(name.replace(fragment, param_fragment), []).append(tensor)
                break
        else:
            merged[name] = [tensor]
    for name, param in ours.named_parameters():
        assert torch.equal(param, torch.cat(merged[name])), name


def test_gguf_config_reads_the_metadata(smollm2_path):
    cfg = gguf_hf_config(smollm2_path)
    assert cfg["num_hidden_layers"] == 30 and cfg["num_key_value_heads"] == 3
    assert cfg["tie_word_embeddings"] is True


def test_dummy_weights_have_the_real_shape(tiny_llama_dir):
    path, hf = tiny_llama_dir
    model = load_model(str(path), "dummy", torch.float32, torch.device("cpu"), seed=3)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    again = load_model(str(path), "dummy", torch.float32, torch.device("cpu"), seed=3)
    assert torch.equal(model.model.embed_tokens.weight, again.model.embed_tokens.weight)


def test_unknown_format_is_refused(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(path), "pickle", torch.float32, torch.device("cpu"), seed=0)
