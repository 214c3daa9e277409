"""Shared optimizer pieces: the optimizer callable over decay groups (both stages), the warm-up + decay
schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qoq.models import PolicyOptions
from qoq.models.optim import LRSchedule, adamw, build_optimizer, check_optimizer


def test_the_optimizer_decays_matrices_only() -> None:
    layer = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    optimizer = build_optimizer(adamw(lr=0.5, weight_decay=0.1), layer.parameters())
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 3]  # the matrix; bias, norm weight, bias
    assert {g["lr"] for g in optimizer.param_groups} == {0.5}


def test_optimizer_settings_are_checked_from_its_init_args() -> None:
    assert check_optimizer(adamw(lr=1e-4), "optimizer") == []
    assert check_optimizer(adamw(lr=0.0, weight_decay=-1.0), "optimizer") == [
        "optimizer.init_args.lr=0.0 must be > 0",
        "optimizer.init_args.weight_decay=-1.0 must be >= 0",
    ]
    with pytest.raises(ValueError, match=r"Policy: optimizer.init_args.lr=-1 must be > 0"):
        PolicyOptions(optimizer=adamw(lr=-1))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(adamw(), [])


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
