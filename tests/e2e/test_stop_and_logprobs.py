"""Stop strings and logprobs through the whole cluster path (SmolLM2, fp32, CPU)."""

import pytest
import torch

from cluster.client import Client
from scheduler.sampling_params import SamplingParams

TIMEOUT = 300
PROMPT = "Write a short story about a robot who learns to paint."


def _greedy(client: Client, max_tokens: int = 40, **params) -> list:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **params)
    return list(client.generate(PROMPT, params, timeout=TIMEOUT))


def _tokens(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def _stop_across_a_token_boundary(deltas) -> str:
    """Two characters of one token's text and two of the next's: two messages of one token
    each (a frontend behind the core may send several tokens in one)."""
    for left, right in zip(deltas[4:], deltas[5:], strict=False):
        one_each = len(left.token_ids) == len(right.token_ids) == 1
        if one_each and len(left.text.strip()) >= 2 and len(right.text.strip()) >= 2:
            return left.text[-2:] + right.text[:2]
    raise AssertionError(f"no two long tokens in a row: {[d.text for d in deltas]}")


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_across_tokens_ends_text_and_request(local_cluster, smollm2_path, include):
    from scheduler.frontend.tokenizer import Tokenizer

    with Client(local_cluster.address) as client:
        reference = _greedy(client)
        full = "".join(d.text for d in reference)
        stop = _stop_across_a_token_boundary(reference)
        deltas = _greedy(client, stop=[stop], include_stop_str_in_output=include)
        info = client.server_info()
    # The request ends on the token that completed the stop string, its blocks freed. Which
    # token that is comes from the text of each prefix of the tokens (the streamed text is it,
    # however the tokens were grouped into messages).
    tokens, tokenizer = _tokens(reference), Tokenizer(smollm2_path)
    completed = next(k for k in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:k]))
    last = deltas[-1]
    assert (last.finish_reason, last.stop_str) == ("stop", stop)
    assert last.usage.completion_tokens == completed
    assert _tokens(deltas) == tokens[:completed]
    cut = full.index(stop) + (len(stop) if include else 0)
    assert "".join(d.text for d in deltas) == full[:cut]
    assert all(r.num_running == 0 for r in info.replicas)


def test_a_stop_token_id_is_the_stop_reason(local_cluster):
    with Client(local_cluster.address) as client:
        reference = _tokens(_greedy(client))
        token = reference[6]
        deltas = _greedy(client, stop_token_ids=[token])
    assert (deltas[-1].finish_reason, deltas[-1].stop_token_id) == ("stop", token)
    assert deltas[-1].WhichOneof("stop_reason") == "stop_token_id"
    assert _tokens(deltas) == reference[: reference.index(token) + 1]


def test_logprobs_match_hf_transformers(local_cluster, hf_smollm2):
    model, tokenizer = hf_smollm2
    with Client(local_cluster.address) as client:
        deltas = _greedy(client, logprobs=5, max_tokens=8)
    tokens = [t for d in deltas for t in d.token_ids]
    positions = [p for d in deltas for p in d.logprobs]
    assert len(positions) == len(tokens) == 8
    prompt = list(deltas[-1].prompt_token_ids)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits.float(), dim=-1)  # [8, vocab]
    total = 0.0
    for row, (token, position) in enumerate(zip(tokens, positions, strict=True)):
        entries = list(position.entries)
        # Greedy: the sampled token is the top one, so it is listed once, first, with rank 1.
        assert (entries[0].token_id, entries[0].rank) == (token, 1)
        top = expected[row].topk(5)
        assert [e.token_id for e in entries] == top.indices.tolist()
        assert [e.rank for e in entries] == [1, 2, 3, 4, 5]
        got = torch.tensor([e.logprob for e in entries])
        torch.testing.assert_close(got, top.values, atol=1e-3, rtol=0)
        assert all(e.decoded_token == tokenizer.decode([e.token_id]) for e in entries)
        total += entries[0].logprob
    assert deltas[-1].cumulative_logprob == pytest.approx(total, abs=1e-4)
