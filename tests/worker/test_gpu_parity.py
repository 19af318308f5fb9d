"""On a GPU, bf16: our models against HF transformers in bf16 (same weights, same card).

Agreement is measured teacher-forced: HF generates 8 x 128 greedy tokens; then our model and
HF's own full forward pass each read every prompt plus those tokens in one pass, and their greedy
choices are compared at every position. The floor is HF against itself: its forward pass against
its generate (incremental decoding, another order of work), measured in the same run.

What is asserted: our bf16 model picks the float32 model's token at least as often as HF's bf16
model does, less one point; and agrees with HF (forward and generate) on 99% of positions or on
the floor less one point. The issue's flat 99% is under the floor on a GPU (2 x H200: SmolLM2
98.3%, the random 1B model 93.4%): HF's bf16 model misses it against itself, so no other
rounding order can be held to it. The free-running common prefix is reported too.
"""

import copy
from dataclasses import dataclass

import pytest
import torch

from tests.conftest import PARITY_PROMPTS
from worker.layers.attention import AttentionMetadata
from worker.loader import load_model
from worker.models.presets import PRESETS

pytestmark = pytest.mark.gpu

NEW_TOKENS = 128
DEVICE = "cuda"


def _hf_trajectories(hf, prompts: list[list[int]]) -> list[list[int]]:
    out = []
    for ids in prompts:
        x = torch.tensor([ids], device=DEVICE)
        with torch.no_grad():
            gen = hf.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        out.append(gen[0, len(ids) :].tolist())
    return out


@torch.inference_mode()
def _greedy_along(model, tokens: list[int], block_size: int = 16) -> list[int]:
    """Our greedy choice after every prefix of tokens, from one paged prefill pass."""
    n = len(tokens)
    num_blocks = -(-n // block_size)
    _, kv_heads, head_dim = model.kv_cache_spec()
    dtype = next(model.parameters()).dtype
    for attn in model.attention_layers():
        attn.key_cache = torch.zeros(
            num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE
        )
        attn.value_cache = torch.zeros_like(attn.key_cache)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=DEVICE),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=DEVICE)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32, device=DEVICE),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=DEVICE),
        max_query_len=n,
        max_seq_len=n,
    )
    ids = torch.tensor(tokens, device=DEVICE)
    hidden = model(ids, torch.arange(n, device=DEVICE), meta)
    return model.compute_logits(hidden).argmax(-1).tolist()


class _HFAlong:
    """HF's own greedy choice after every prefix, from one full forward pass (not generate)."""

    def __init__(self, hf) -> None:
        self.hf = hf


@torch.inference_mode()
def _along(model, tokens: list[int]) -> list[int]:
    if isinstance(model, _HFAlong):
        return model.hf(torch.tensor([tokens], device=DEVICE)).logits[0].argmax(-1).tolist()
    return _greedy_along(model, tokens)


@dataclass
class Agreement:
    vs_forward: float  # ours vs HF's full forward, position by position along HF's tokens
    vs_generate: float  # ours vs the tokens HF generate chose
    floor: float  # HF's full forward vs HF's generate: the noise of the order of work alone
    prefix: int  # the shortest free-running common prefix with HF generate
    # Against the same model in float32 (HF's forward): how often each bf16 implementation
    # makes the float32 choice.
    ours_vs_fp32: float
    hf_vs_fp32: float

    def __str__(self) -> str:
        return (
            f"{self.vs_forward:.2%} of greedy tokens agree with HF's forward pass on the same "
            f"tokens, {self.vs_generate:.2%} with HF generate (first disagreement at "
            f"{self.prefix}); HF's own forward agrees with HF generate on {self.floor:.2%}; "
            f"against float32, ours {self.ours_vs_fp32:.2%}, HF bf16 {self.hf_vs_fp32:.2%}"
        )


def _agreement(ours, hf, hf_fp32, prompts) -> Agreement:
    refs = _hf_trajectories(hf, prompts)
    same_forward = same_generate = same_floor = same_ours_fp32 = same_hf_fp32 = total = 0
    prefix = []
    for ids, ref in zip(prompts, refs, strict=True):
        choices = _along(ours, ids + ref)[len(ids) - 1 : -1]
        hf_choices = _along(_HFAlong(hf), ids + ref)[len(ids) - 1 : -1]
        fp32_choices = _along(_HFAlong(hf_fp32), ids + ref)[len(ids) - 1 : -1]
        same_forward += _same(choices, hf_choices)
        same_generate += _same(choices, ref)
        same_floor += _same(hf_choices, ref)
        same_ours_fp32 += _same(choices, fp32_choices)
        same_hf_fp32 += _same(hf_choices, fp32_choices)
        total += len(ref)
        prefix.append(
            next((i for i, (a, b) in enumerate(zip(choices, ref, strict=True)) if a != b), len(ref))
        )
    return Agreement(
        same_forward / total,
        same_generate / total,
        same_floor / total,
        min(prefix),
        same_ours_fp32 / total,
        same_hf_fp32 / total,
    )


def _bf16_as_loaded(hf_fp32):
    """A bf16 copy of an HF model as from_pretrained(dtype=bfloat16) makes it: .to(bfloat16)
    would also round the rotary inverse frequencies (a buffer HF computes in float32), which
    moves every rotary angle (by up to 0.03 in cos at position 20 for SmolLM2)."""
    hf = copy.deepcopy(hf_fp32).to(torch.bfloat16)
    for name, buffer in hf_fp32.named_buffers():
        if name.endswith("inv_freq"):
            module_name, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(module_name), attr, buffer.clone())
    return hf


def _same(a: list[int], b: list[int]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def test_smollm2_bf16_agrees_with_hf(smollm2_path, hf_smollm2):
    hf, tokenizer = hf_smollm2  # float32 on the CPU: copied, so the fixture stays as it is
    hf_fp32 = copy.deepcopy(hf).to(DEVICE)
    hf_bf16 = _bf16_as_loaded(hf_fp32)
    ours = load_model(smollm2_path, "gguf", torch.bfloat16, torch.device(DEVICE), seed=0)
    prompts = [tokenizer.encode(p) for p in PARITY_PROMPTS]
    agreement = _agreement(ours, hf_bf16, hf_fp32, prompts)
    print(f"SmolLM2 bf16: {agreement}")
    assert agreement.ours_vs_fp32 >= agreement.hf_vs_fp32 - 0.01  # as near float32 as HF
    assert agreement.vs_forward >= min(0.99, agreement.floor - 0.01)
    assert agreement.vs_generate >= min(0.99, agreement.floor - 0.01)


def test_llama_1b_random_bf16_agrees_with_hf():
    """Random weights give flat next-token distributions, where bf16 rounding alone flips the
    argmax: the floor (HF's forward pass against HF's generate) shows how often."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = {k: v for k, v in PRESETS["llama-3.2-1b"].items() if k != "architectures"}
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.bfloat16)
    hf = hf.to(DEVICE).eval()
    ours = load_model("llama-3.2-1b", "dummy", torch.bfloat16, torch.device(DEVICE), seed=0)
    ours.load_weights((n, t) for n, t in hf.state_dict().items())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128256, (16 + 8 * i,), generator=gen).tolist() for i in range(8)]
    agreement = _agreement(ours, hf, copy.deepcopy(hf).float(), prompts)
    print(f"Llama-1B random bf16: {agreement}")
    assert agreement.ours_vs_fp32 >= agreement.hf_vs_fp32 - 0.01  # as near float32 as HF
    assert agreement.vs_forward >= min(0.99, agreement.floor - 0.01)
    assert agreement.vs_generate >= min(0.99, agreement.floor - 0.01)
