"""Optimizer pieces shared by every training stage: AdamW parameter groups and a warm-up + decay schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


def decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: weight decay on matrices only (biases, norms and other 1-D tensors exempt).

    Args:
        params: the trainable parameters.
        weight_decay: decay of the matrices.

    Returns:
        The non-empty groups.
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    params: Iterable[nn.Parameter], name: str, lr: float, betas: tuple[float, float], weight_decay: float
) -> torch.optim.Optimizer:
    """AdamW (``name="adamw"``) or bitsandbytes' AdamW8bit (``"adamw8bit"``) over :func:`decay_groups`.

    Raises:
        ValueError: no trainable parameter.
    """
    params = list(params)
    if not params:
        raise ValueError("the policy has no trainable parameters (check `freeze`)")
    groups = decay_groups(params, weight_decay)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=lr, betas=tuple(betas))
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas))


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from 0, then decay to ``min_ratio`` of the peak learning rate (per optimizer step).

    Args:
        warmup_steps: steps of linear warm-up.
        decay: "cosine", "linear" or "constant" (no decay after the warm-up).
        total_steps: step at which the decay ends; None: the trainer's ``max_steps``.
        min_ratio: the final learning rate as a fraction of the peak.
    """

    warmup_steps: int = 0
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    total_steps: int | None = None
    min_ratio: float = 0.0

    def factor(self, step: int, total_steps: int) -> float:
        """The learning-rate multiplier at optimizer step ``step`` (0-based) of ``total_steps``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * t)) if self.decay == "cosine" else 1.0 - t
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int) -> dict[str, Any]:
        """A Lightning ``lr_scheduler`` entry (stepped every optimizer step)."""
        total = self.total_steps or total_steps
        if total is None or total < 1:
            raise ValueError(
                "LRSchedule: set total_steps or the trainer's max_steps (the decay needs an end)"
            )
        lambda_ = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self.factor(step, total))
        return {"scheduler": lambda_, "interval": "step", "frequency": 1}


__all__ = ["LRSchedule", "build_optimizer", "decay_groups"]
