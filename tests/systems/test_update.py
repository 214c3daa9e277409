"""The update's plain functions, without a Trainer: batch planning, old log-probs and the PPO loop on a
toy policy (one logit vector shared by every position)."""

from __future__ import annotations

import pytest
import torch

from qoq.systems import update
from qoq.systems.update import LossConfig, OldLogprobs, UpdateHooks, UpdateSettings
from qoq.testing import make_batch
from qoq.types import PromptBatch, RolloutBatch, SamplingParams

INDEX = torch.tensor([0, 0, 1, 1, 2, 2])  # 3 prompts x 2 responses


def _rollout(engine_logprobs: torch.Tensor | None = None) -> RolloutBatch:
    ids = torch.tensor([[1, 2, 0], [2, 2, 1], [0, 1, 2], [1, 1, 1], [2, 0, 0], [0, 0, 2]])
    mask = torch.ones(6, 3, dtype=torch.bool)
    mask[4, 2] = False
    return RolloutBatch(INDEX, ids, mask, ["r"] * 6, engine_logprobs=engine_logprobs)


def _batch() -> PromptBatch:
    return make_batch(["q"] * 3, [["a"]] * 3, labels=("a", "b"), domains=["ct"] * 3)


class _Toy(torch.nn.Module):
    """log p(token) = log_softmax(w), the same at every position; counts its no-grad forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.1, -0.2, 0.3]))
        self.forwards: list[int] = []

    def logp(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.w, -1)[ids]  # [n, R]

    def response_logprobs(self, embeds, response_ids, response_mask, prompt_index, temperature=1.0, **kw):
        self.forwards.append(len(response_ids))
        return self.logp(response_ids), None


def test_mini_batch_plan_splits_by_group_and_is_seeded_by_step() -> None:
    assert [[r.tolist() for r in e] for e in update.mini_batch_plan(INDEX, 3, 1, 1, step=0)] == [[[0, 1, 2, 3, 4, 5]]]
    plan = update.mini_batch_plan(INDEX, 3, ppo_epochs=2, mini_batches=3, step=7)
    for epoch in plan:
        rows = sorted(r for mb in epoch for r in mb.tolist())
        assert rows == list(range(6)) and all(len(set(INDEX[mb].tolist())) == 1 for mb in epoch)
    again = update.mini_batch_plan(INDEX, 3, ppo_epochs=2, mini_batches=3, step=7)
    assert [[r.tolist() for r in e] for e in plan] == [[r.tolist() for r in e] for e in again]


def test_micro_batches_by_rows_and_token_budget() -> None:
    rows = torch.arange(6)
    assert [m.tolist() for m in update.micro_batches(rows, INDEX, 3, None, 4, None)] == [[0, 1, 2, 3], [4, 5]]
    # prompt lengths 5, 1, 1; width 3: a micro-batch holds rows while rows x (longest + 3) <= 16
    got = update.micro_batches(rows, INDEX, 3, [5, 1, 1], None, 16)
    assert [m.tolist() for m in got] == [[0, 1], [2, 3, 4, 5]]


@pytest.mark.parametrize(("mode", "damping", "exact", "forward"), [
    ("reuse", False, False, [4]), ("forward", False, False, [6]), ("reuse", True, True, [4]), ("reuse", True, False, [6]),
])  # fmt: skip
def test_old_logprobs_rule(mode, damping, exact, forward) -> None:
    toy, engine = _Toy(), torch.full((6, 3), -1.0)
    plan = update.mini_batch_plan(INDEX, 3, 1, 3, step=0)
    settings = UpdateSettings(LossConfig(), mini_batches=3, old_logprobs=mode)
    old = update.old_logprobs(toy, [], _rollout(engine), plan, settings, damping, exact)
    assert toy.forwards == forward
    assert old.known.sum().item() == forward[0] and bool((old.logp[~old.known] == 0).all())
    if damping:
        assert torch.equal(old.behaviour, engine if exact else old.logp)
    assert engine.equal(torch.full((6, 3), -1.0))


def test_ppo_update_fills_old_logprobs_from_the_first_pass_and_steps_the_optimizer() -> None:
    toy, rollout = _Toy(), _rollout()
    opt = torch.optim.AdamW(toy.parameters(), lr=0.1)
    steps = []
    hooks = UpdateHooks(
        optimizer=opt,
        grad_logprobs=lambda rows: (toy.logp(rollout.response_ids[rows]), None),
        backward=lambda loss: loss.backward(),
        clip_grad=lambda max_norm: torch.nn.utils.clip_grad_norm_(toy.parameters(), max_norm),
    )
    opt.register_step_post_hook(lambda *a: steps.append(1))
    settings = UpdateSettings(LossConfig(), ppo_epochs=2, mini_batches=1, micro_batch_size=4)
    plan = update.mini_batch_plan(INDEX, 3, 2, 1, step=0)
    old = OldLogprobs(torch.zeros(6, 3), torch.zeros(6, dtype=torch.bool))
    expected_old = toy.logp(rollout.response_ids).detach()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 0.0])
    metrics = update.ppo_update(_batch(), rollout, old, None, advantages, plan, settings, hooks)
    assert len(steps) == 2 and torch.equal(old.logp, expected_old)  # filled before the first step
    assert set(metrics) >= {"loss", "pg_loss", "clip_frac", "grad_norm"} and torch.isfinite(metrics["loss"])
    assert not torch.equal(toy.w.detach(), torch.tensor([0.1, -0.2, 0.3]))


def test_ppo_update_names_the_prompts_of_a_non_finite_loss() -> None:
    rollout = _rollout()
    hooks = UpdateHooks(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1),
                        lambda rows: (torch.full(rollout.response_ids[rows].shape, float("nan")), None),
                        lambda loss: None, lambda max_norm: 0.0, step=3)  # fmt: skip
    old = OldLogprobs(torch.zeros(6, 3), torch.ones(6, dtype=torch.bool))
    plan = update.mini_batch_plan(INDEX, 3, 1, 1, step=0)
    with pytest.raises(update.NonFiniteError, match=r"step 3, phase 'update \(current log-probs\)'.*rec-0"):
        update.ppo_update(_batch(), rollout, old, None, torch.zeros(6), plan, UpdateSettings(LossConfig()), hooks)
    engine_needed = UpdateSettings(LossConfig(mismatch="token_tis"))
    with pytest.raises(ValueError, match="needs the rollout engine's log-probs"):
        update.ppo_update(_batch(), rollout, old, None, torch.zeros(6), plan, engine_needed, hooks)


def test_engine_logprobs_are_exact_only_without_a_cut() -> None:
    rollout = _rollout(torch.zeros(6, 3))
    assert update.engine_logprobs_are_exact(rollout, SamplingParams())
    assert not update.engine_logprobs_are_exact(rollout, SamplingParams(top_p=0.9))
    assert not update.engine_logprobs_are_exact(_rollout(), SamplingParams())
