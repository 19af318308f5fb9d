"""Logprobs as vLLM returns them: for each sampled position, {token id: Logprob}, the sampled
token first, then the top k of the model's raw distribution."""

from dataclasses import dataclass

from protos import serving_pb2, worker_pb2


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token
    decoded_token: str | None = None


PositionLogprobs = dict[int, Logprob]  # token id -> its logprob, the sampled token first


def unpack_logprobs(result: worker_pb2.StepResult) -> list[PositionLogprobs | None]:
    """One entry per sampled token of the result: its logprobs, or None where none were asked
    (the whole result carries none when no request asked)."""
    if not result.sampled_logprobs:
        return [None] * len(result.token_ids)
    out: list[PositionLogprobs | None] = []
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
        entry = {token: Logprob(logprob, rank)}
        top = zip(
            result.top_token_ids[offset : offset + k],
            result.top_logprobs[offset : offset + k],
            strict=True,
        )
        for i, (top_id, top_logprob) in enumerate(top):
            entry.setdefault(top_id, Logprob(top_logprob, i + 1))
        offset += k
        out.append(entry)
    return out


def logprobs_to_proto(position: PositionLogprobs) -> serving_pb2.TokenLogprobs:
    """One position's logprobs as both wires carry them (decoded_token as the dict has it)."""
    return serving_pb2.TokenLogprobs(
        entries=[
            serving_pb2.Logprob(
                token_id=token,
                logprob=lp.logprob,
                rank=lp.rank,
                decoded_token=lp.decoded_token or "",
            )
            for token, lp in position.items()
        ]
    )
