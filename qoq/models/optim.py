"""Optimizer pieces shared by every training stage: the optimizer as a callable config, parameter groups
(weight decay on matrices only) and a warm-up + decay schedule."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn


#: Builds an optimizer from parameter groups (``torch.optim.AdamW``, bitsandbytes' ``AdamW8bit``, ...); in a config
#: ``{class_path: torch.optim.AdamW, init_args: {lr: 3.0e-4, betas: [0.9, 0.999], weight_decay: 0.0}}``.
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


def adamw(
    lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0
) -> OptimizerCallable:
    """``torch.optim.AdamW`` with these settings, as an optimizer callable (the default of both stages)."""
    return functools.partial(torch.optim.AdamW, lr=lr, betas=betas, weight_decay=weight_decay)


def decay_groups(params: Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    """Parameter groups with weight decay on matrices only: biases, norms and other 1-D tensors get 0.

    The matrices' group keeps the optimizer's own ``weight_decay``.

    Args:
        params: the trainable parameters.

    Returns:
        The non-empty groups.
    """
    params = list(params)
    groups = [
        {"params": [p for p in params if p.ndim >= 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def check_optimizer(optimizer: OptimizerCallable, option: str) -> list[str]:
    """What is wrong with an optimizer callable's settings (``lr`` > 0, ``weight_decay`` >= 0), as far as its
    init args are readable (a ``functools.partial``, as jsonargparse builds); the optimizer checks the rest.

    Args:
        optimizer: the optimizer callable.
        option: its option name, for the messages (e.g. "optimizer").

    Returns:
        One message per bad setting; empty when none.
    """
    settings = getattr(optimizer, "keywords", None) or {}
    lr, weight_decay = settings.get("lr", 1.0), settings.get("weight_decay", 0.0)
    problems = []
    if not (isinstance(lr, (int, float)) and lr > 0):
        problems.append(f"{option}.init_args.lr={lr} must be > 0")
    if isinstance(weight_decay, (int, float)) and weight_decay < 0:
        problems.append(f"{option}.init_args.weight_decay={weight_decay} must be >= 0")
    return problems


def build_optimizer(optimizer: OptimizerCallable, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer over :func:`decay_groups` of the trainable parameters.

    Raises:
        ValueError: no trainable parameter.
    """
    params = list(params)
    if not params:
        raise ValueError("the policy has no trainable parameters (check `freeze`)")
    return optimizer(decay_groups(params))


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


__all__ = ["LRSchedule", "OptimizerCallable", "adamw", "build_optimizer", "check_optimizer", "decay_groups"]
