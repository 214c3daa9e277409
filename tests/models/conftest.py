"""Shared helpers of the model tests: hand-built PromptBatch objects and a tiny Trainer."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from qoq.types import ModalityBatch, PromptBatch, RewardTarget


def _make_batch(
    texts: Sequence[str],
    answers: Sequence[Sequence[str]],
    modalities: dict[str, tuple[torch.Tensor, Sequence[int]]] | None = None,
    labels: Sequence[str] = ("normal", "abnormal"),
    references: Sequence[str] | None = None,
) -> PromptBatch:
    """A PromptBatch from texts, answers and ``kind -> (values, owners)``."""
    p = len(texts)
    return PromptBatch(
        ids=[f"rec-{i}" for i in range(p)],
        texts=list(texts),
        modalities={
            k: ModalityBatch(values, torch.tensor(list(owner), dtype=torch.long))
            for k, (values, owner) in (modalities or {}).items()
        },
        targets=[RewardTarget(answer=tuple(a), labels=tuple(labels)) for a in answers],
        domains=["test"] * p,
        datasets=["test"] * p,
        domain_ids=torch.zeros(p, dtype=torch.long),
        references=list(references) if references is not None else None,
    )


def _fit(module: L.LightningModule, batches: Sequence[PromptBatch], steps: int) -> None:
    """Run ``steps`` optimizer steps of ``module``'s own stage on CPU, cycling through ``batches``."""
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    stream = [batches[i % len(batches)] for i in range(steps)]  # one epoch: no per-epoch overhead
    loader = DataLoader(stream, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, loader)


@pytest.fixture
def make_batch():
    """The batch factory: ``make_batch(texts, answers, modalities=None, labels=..., references=None)``."""
    return _make_batch


@pytest.fixture
def fit():
    """The stand-alone stage runner: ``fit(module, batches, steps)``."""
    return _fit
