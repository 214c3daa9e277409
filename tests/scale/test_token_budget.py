"""Token-budget micro-batching: hand-computed splits, and the same update as one whole pass."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from scale_helpers import fit_system, text_batch

from qoq.rl.advantages import GRPO
from qoq.rl.rewards import RewardFn
from qoq.rl.rollout import HFEngine
from qoq.systems import PolicyOptimization
from qoq.testing import tiny_text_policy
from qoq.types import RolloutBatch, SamplingParams



def _split(token_budget, micro_batch_size, prompt_lengths, prompt_index, width):
    system = PolicyOptimization(
        tiny_text_policy(), token_budget=token_budget, micro_batch_size=micro_batch_size
    )
    n = len(prompt_index)
    rollout = RolloutBatch(
        prompt_index=torch.tensor(prompt_index),
        response_ids=torch.zeros(n, width, dtype=torch.long),
        response_mask=torch.ones(n, width, dtype=torch.bool),
        texts=[""] * n,
    )
    return [m.tolist() for m in system._micro_batches(torch.arange(n), rollout, prompt_lengths)]


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


class _GradCapture(L.Callback):
    """Keeps the policy's gradients as the optimizer step sees them (summed over the micro-batches)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}


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
    capture = _GradCapture()
    fit_system(system, [batch], steps=1, callbacks=[capture])
    return capture.grads


def test_a_token_budget_gives_the_gradient_of_one_whole_pass():
    whole, split = _step_gradients(None), _step_gradients(40)
    assert whole.keys() == split.keys() and any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("budget", [0, -5])
def test_bad_budget_is_rejected(budget):
    with pytest.raises(ValueError, match="token_budget"):
        PolicyOptimization(tiny_text_policy(), token_budget=budget)
