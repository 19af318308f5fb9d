"""Logprobs of sampled positions: the sampled token first, then the top k of the model's raw
distribution. The workers pack them into a StepResult; unpack_logprobs turns them into the
TokenLogprobs both wires carry (engine core -> frontend -> client); the offline LLM hands users
{token id: Logprob} per position, as vLLM does."""

from dataclasses import dataclass

from protos import serving_pb2, worker_pb2


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


PositionLogprobs = dict[int, Logprob]  # token id -> its logprob, the sampled token first


def unpack_logprobs(result: worker_pb2.StepResult) -> list[serving_pb2.TokenLogprobs | None]:
    """One entry per sampled token of the result: its logprobs as both wires carry them (the
    sampled token first, then the top k by rank, the sampled one not twice; decoded_token
    unset), or None where none were asked (the whole result carries none when no request
    asked)."""
    if not result.sampled_logprobs:
        return [None] * len(result.token_ids)
    out: list[serving_pb2.TokenLogprobs | None] = []
    offset = 0
    for token, logprob, rank, k in zip(
        result.token_ids,
        result.sampled_logprobs,
        result.sampled_ranks,
        result.num_top_logprobs,
        strict=True,
    ):
        if k < 0:  # this request asked for none
            out.append(None)
            continue
        entries = [serving_pb2.Logprob(token_id=token, logprob=logprob, rank=rank)]
        top = zip(
            result.top_token_ids[offset : offset + k],
            result.top_logprobs[offset : offset + k],
            strict=True,
        )
        entries += [
            serving_pb2.Logprob(token_id=top_id, logprob=top_logprob, rank=i + 1)
            for i, (top_id, top_logprob) in enumerate(top)
            if top_id != token
        ]
        offset += k
        out.append(serving_pb2.TokenLogprobs(entries=entries))
    return out
