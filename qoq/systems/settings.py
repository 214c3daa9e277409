"""The RL system's start: refusing settings that cannot train, and loading a warm start's weights."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from qoq.models.optim import OptimizerCallable, check_optimizer
from qoq.models.policy import Policy
from qoq.types import SamplingParams


def check_settings(
    sampling: SamplingParams,
    optimizer: OptimizerCallable,
    ppo_epochs: int,
    mini_batches: int,
    micro_batch_size: int | None,
    token_budget: int | None,
    old_logprobs: str,
    init_policy_from: str | None,
) -> None:
    """Refuse settings that cannot train, before any data or weights are built.

    Raises:
        ValueError: names every bad setting (one line).
        FileNotFoundError: ``init_policy_from`` names no file.
    """
    n = sampling.n
    problems = [
        message
        for bad, message in (
            (n < 2, (f"sampling.n={n}: group-relative advantages (every estimator qoq ships) need >= 2 "
                     "responses per prompt; with one they are all zero and nothing trains")),
            (ppo_epochs < 1, f"ppo_epochs={ppo_epochs} must be >= 1"),
            (mini_batches < 1, f"mini_batches={mini_batches} must be >= 1"),
            (micro_batch_size is not None and micro_batch_size < 1,
             f"micro_batch_size={micro_batch_size} must be >= 1 or None"),
            (token_budget is not None and token_budget < 1, f"token_budget must be >= 1 or None, got {token_budget}"),
            (old_logprobs not in ("reuse", "forward"), f"old_logprobs must be 'reuse' or 'forward', got {old_logprobs!r}"),
        )
        if bad
    ] + check_optimizer(optimizer, "optimizer")  # fmt: skip
    if problems:
        raise ValueError("PolicyOptimization: " + "; ".join(problems))
    if init_policy_from and not Path(init_policy_from).expanduser().is_file():
        raise FileNotFoundError(f"init_policy_from: no checkpoint at {init_policy_from} (run the SFT stage first?)")


def save_config(module: Any, frame: FrameType | None, dataclasses: dict[str, Any]) -> None:
    """Save a module's settings in its checkpoints as config, never as pickled objects (``weights_only`` loads).

    Built by LightningCLI (its hyperparameters then carry ``_class_path``), the parsed config is saved whole,
    components included (``qoq test --ckpt_path`` and ``qoq export`` rebuild from it). Built in Python, the
    component objects are left out and the settings ``dataclasses`` (name -> value or None) stored as dicts.

    Args:
        module: the LightningModule, from its ``__init__``.
        frame: that ``__init__``'s frame (``inspect.currentframe()``).
        dataclasses: the settings dataclasses by argument name.
    """
    objects = ["policy", "advantage", "reward", "rollout", "optimizer", *dataclasses]
    module.save_hyperparameters(ignore=objects, frame=frame)
    if "_class_path" in module.hparams:
        module.save_hyperparameters(frame=frame)
    for key, value in dataclasses.items():
        if value is not None and not isinstance(module.hparams.get(key), dict):
            module.hparams[key] = asdict(value)


def load_policy_weights(policy: Policy, ckpt_path: str | Path) -> None:
    """Load a policy's weights from a ``Policy`` (SFT) or ``PolicyOptimization`` checkpoint.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_path``.
        ValueError: the checkpoint was trained with another tokenizer.
        RuntimeError: the checkpoint's tensors do not fit the policy (names the missing / unexpected keys).
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_policy_from: no checkpoint at {path} (run the SFT stage first?)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    policy.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), path)
    state = checkpoint["state_dict"]
    if any(k.startswith("policy.") for k in state):
        state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"init_policy_from {path}: weights do not fit the policy; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


__all__ = ["check_settings", "load_policy_weights", "save_config"]
