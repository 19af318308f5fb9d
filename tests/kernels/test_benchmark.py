"""kernels.benchmark's mixed step: its three layouts of one attention agree (on the CPU path
here; the benchmark prints their difference on the GPU), and a layout that is wrong fails."""

import torch

from kernels.benchmark import attend, mixed_batch


def _outputs(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    one = attend(batch["one call"])
    split = torch.cat([attend(batch["decodes"]), attend(batch["prompt"])])
    return one, split, attend(batch["rows"])


def test_the_three_layouts_of_a_mixed_step_are_one_attention():
    for decodes, context, prompt in [(3, 20, 9), (2, 40, 33), (1, 5, 17)]:
        batch = mixed_batch(decodes, context, prompt, device="cpu", dtype=torch.float32)
        one, split, rows = _outputs(batch)
        assert one.shape == (decodes + prompt, *one.shape[1:])
        torch.testing.assert_close(split, one)
        torch.testing.assert_close(rows, one)


def test_a_prompt_row_that_sees_one_token_too_many_differs():
    batch = mixed_batch(2, 20, 9, device="cpu", dtype=torch.float32)
    *tensors, scale, max_query_len, max_seq_len = batch["rows"]
    lens = tensors[4].clone()
    lens[2] += 1  # the prompt's first token would attend to the second
    tensors[4] = lens
    wrong = attend((*tensors, scale, max_query_len, max_seq_len))
    one = attend(batch["one call"])
    torch.testing.assert_close(wrong[3:], one[3:])  # the other rows as they were
    assert (wrong[2] - one[2]).abs().max() > 1e-3
