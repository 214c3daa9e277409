"""Shared optimizer pieces: decay groups (both stages) and the warm-up + decay schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qoq.models.optim import LRSchedule, decay_groups


def test_decay_groups_exempt_one_dimensional_parameters() -> None:
    layer = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    groups = decay_groups(layer.parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in groups] == [1, 3]  # the weight matrix; bias, norm weight and bias


def test_schedule_warms_up_then_decays() -> None:
    cosine = LRSchedule(warmup_steps=4, decay="cosine", min_ratio=0.1)
    assert [cosine.factor(s, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine.factor(9, 14) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    assert cosine.factor(14, 14) == pytest.approx(0.1) and cosine.factor(20, 14) == pytest.approx(0.1)
    assert LRSchedule(warmup_steps=0, decay="linear").factor(5, 10) == pytest.approx(0.5)
    assert LRSchedule(warmup_steps=2, decay="constant").factor(7, 10) == 1.0


def test_schedule_steps_an_optimizer() -> None:
    param = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = LRSchedule(warmup_steps=2, decay="linear").scheduler(opt, total_steps=4)["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="total_steps"):
        LRSchedule().scheduler(opt, total_steps=None)
