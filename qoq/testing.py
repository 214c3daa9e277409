"""Small builders that tests, benchmarks and examples share: a quiet Trainer, a gradient-capturing callback,
a hand-made prompt batch, a text-only tiny policy.

``tests/conftest.py`` hands them out as the fixtures ``quiet_trainer``, ``fit``, ``make_batch`` and
``tiny_text_policy``; scripts outside pytest (benchmarks, multi-process workers) import them from here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from qoq.models import Policy, PolicyOptions, TinyLM
from qoq.types import ModalityBatch, PromptBatch, RewardTarget

#: The smallest Qwen2-shaped ``TinyLM`` (head_dim 32, < 1M parameters).
TINY_LM: dict[str, int] = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}


def quiet_trainer(max_steps: int = -1, **overrides: Any) -> L.Trainer:
    """A CPU ``Trainer`` that writes and prints nothing of its own (no logger, checkpoints, progress bar,
    model summary or sanity validation).

    Args:
        max_steps: optimizer steps (-1: epochs decide).
        **overrides: any other ``Trainer`` argument (``devices``, ``callbacks``, ``default_root_dir``, ...).
    """
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(max_steps=max_steps, **(settings | overrides))


def fit(module: L.LightningModule, batches: Sequence[Any], steps: int, **trainer_args: Any) -> L.Trainer:
    """Run ``steps`` training steps of ``module`` on a :func:`quiet_trainer`, cycling through ``batches``.

    The batches are one epoch of ``steps`` (no per-epoch overhead), passed as they are (no collation).

    Returns:
        The trainer, after ``fit``.
    """
    trainer = quiet_trainer(steps, **trainer_args)
    stream = [batches[i % len(batches)] for i in range(steps)]
    trainer.fit(module, DataLoader(stream, batch_size=None, collate_fn=lambda b: b))
    return trainer


class GradCapture(L.Callback):
    """Keeps the policy's gradients at every optimizer step (summed over the micro-batches) in ``grads``."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        params = pl_module.policy.named_parameters()
        self.grads.append({n: p.grad.clone() for n, p in params if p.grad is not None})


def make_batch(
    texts: Sequence[str],
    answers: Sequence[Sequence[str]] | None = None,
    modalities: dict[str, tuple[torch.Tensor, Sequence[int]]] | None = None,
    labels: Sequence[str] = ("normal", "abnormal"),
    references: Sequence[str] | None = None,
    domains: Sequence[str] | None = None,
) -> PromptBatch:
    """A ``PromptBatch`` of records ``rec-0``, ``rec-1``, ... built by hand.

    Args:
        texts: the prompts.
        answers: each prompt's gold answers (default: "normal" for every prompt).
        modalities: kind -> ``(values [M, ...], owner prompt of each item)``.
        labels: the label set of every target.
        references: reference responses (SFT), or None.
        domains: each prompt's domain (also its dataset; default "test"). Domain ids are all 0.
    """
    p = len(texts)
    answers = answers if answers is not None else [["normal"]] * p
    domains = list(domains) if domains is not None else ["test"] * p
    return PromptBatch(
        ids=[f"rec-{i}" for i in range(p)],
        texts=list(texts),
        modalities={
            k: ModalityBatch(values, torch.tensor(list(owner), dtype=torch.long))
            for k, (values, owner) in (modalities or {}).items()
        },
        targets=[RewardTarget(answer=tuple(a), labels=tuple(labels)) for a in answers],
        domains=domains,
        datasets=list(domains),
        domain_ids=torch.zeros(p, dtype=torch.long),
        references=list(references) if references is not None else None,
    )


def tiny_text_policy(lm: dict[str, Any] | None = None, **options: Any) -> Policy:
    """A text-only :class:`~qoq.models.Policy` (no encoders) on a ``TinyLM``, unbuilt.

    Args:
        lm: ``TinyLM`` arguments (default :data:`TINY_LM`).
        **options: :class:`~qoq.models.PolicyOptions` (``lora``, ``system_prompt``, ...).
    """
    return Policy(TinyLM(**(lm if lm is not None else TINY_LM)), options=PolicyOptions(**options))


__all__ = ["TINY_LM", "GradCapture", "fit", "make_batch", "quiet_trainer", "state_digest", "tiny_text_policy"]


def state_digest(state: Any) -> str:
    """SHA-256 of a nested state (dicts, lists, tensors, scalars): tensor bytes, dtype and shape, independent
    of storage and device; used to compare weights, optimizer and estimator states bit for bit."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                h.update(f"K{k!r}".encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"V{x!r}".encode())

    feed(state)
    return h.hexdigest()
