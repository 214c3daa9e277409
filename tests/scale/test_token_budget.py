"""Token-budget micro-batching: hand-computed splits, and the same update as one whole pass."""

from __future__ import annotations

import pytest
import torch
from scale_helpers import fit_system, text_batch

from qoq.rl.advantages import GRPO
from qoq.rl.rewards import RewardFn
from qoq.rl.rollout import HFEngine
from qoq.systems import PolicyOptimization
from qoq.systems.update import micro_batches
from qoq.testing import GradCapture, tiny_text_policy
from qoq.types import SamplingParams



def _split(token_budget, micro_batch_size, prompt_lengths, prompt_index, width):
    rows = torch.arange(len(prompt_index))
    index = torch.tensor(prompt_index)
    return [m.tolist() for m in micro_batches(rows, index, width, prompt_lengths, micro_batch_size, token_budget)]


def test_rows_are_packed_by_padded_tokens():
    # prompts of 10 and 30 positions, responses padded to 6: a row costs (longest prompt so far + 6)
    lengths, index = [10, 30], [0, 0, 1, 1]
    # budget 40: rows 0,1 -> 2 x 16 = 32; adding row 2 -> 3 x 36 = 108 > 40; row 3 alone: 2 x 36 > 40
    assert _split(40, None, lengths, index, 6) == [[0, 1], [2], [3]]
    assert _split(72, None, lengths, index, 6) == [[0, 1], [2, 3]]  # 2 x 36 = 72 fits
    assert _split(10_000, None, lengths, index, 6) == [[0, 1, 2, 3]]
    assert _split(1, None, lengths, index, 6) == [[0], [1], [2], [3]]  # at least one row each
    assert _split(10_000, 3, lengths, index, 6) == [[0, 1, 2], [3]]  # both limits hold
    assert _split(None, 3, lengths, index, 6) == [[0, 1, 2], [3]]


def _step_gradients(token_budget):
    system = PolicyOptimization(
        tiny_text_policy(system_prompt=None),
        advantage=GRPO(),
        reward=RewardFn(weights={"accuracy": 0.5, "length": 0.5}),
        rollout=HFEngine(),
        sampling=SamplingParams(n=3, max_new_tokens=6, seed=0),
        token_budget=token_budget,
        grad_clip=0.0,
    )
    batch = text_batch(["Short?", "A much longer question about the chest x-ray findings?"], ["ct", "mri"])
    capture = GradCapture()
    fit_system(system, [batch], steps=1, callbacks=[capture])
    return capture.grads[-1]


def test_a_token_budget_gives_the_gradient_of_one_whole_pass():
    whole, split = _step_gradients(None), _step_gradients(40)
    assert whole.keys() == split.keys() and any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("budget", [0, -5])
def test_bad_budget_is_rejected(budget):
    with pytest.raises(ValueError, match="token_budget"):
        PolicyOptimization(tiny_text_policy(), token_budget=budget)
