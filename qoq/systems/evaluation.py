"""Evaluation records of the RL system's validation / test steps (read by :mod:`qoq.callbacks`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from qoq.rl.rewards import RewardOutput, extract_answer, parse_boxes
from qoq.types import PromptBatch, RolloutBatch, SamplingParams


def generate(policy: Any, engine: Any, batch: PromptBatch, params: SamplingParams) -> RolloutBatch:
    """The policy's responses to ``batch`` (no gradients), e.g. with the greedy ``eval_sampling``."""
    with torch.no_grad():
        embeds = policy.prompt_embeds(batch)
        return engine.generate([e.detach() for e in embeds], params)


def prediction_rows(batch: PromptBatch, rollout: RolloutBatch, synonyms: Any) -> list[dict[str, Any]]:
    """One :func:`qoq.callbacks.predictions.prediction_row` per response (reasoning, boxes, answer)."""
    from qoq.callbacks.predictions import prediction_row

    index = rollout.prompt_index.tolist()
    return [prediction_row(batch, i, text, synonyms) for text, i in zip(rollout.texts, index, strict=True)]


def eval_records(batch: PromptBatch, rollout: RolloutBatch, scored: RewardOutput, synonyms: Any) -> list[Any]:
    """One :class:`~qoq.callbacks.metrics.EvalRecord` per response: answer, boxes, rewards, IoU.

    Args:
        batch: the evaluated prompts.
        rollout: their responses (``eval_sampling``).
        scored: the responses' rewards.
        synonyms: the reward function's answer synonyms (for the extracted answer).
    """
    from qoq.callbacks.metrics import EvalRecord

    iou = scored.components.get("iou")
    records = []
    for row, i in enumerate(rollout.prompt_index.tolist()):
        target, text = batch.targets[i], rollout.texts[row]
        iou_value = float(iou[row]) if iou is not None and math.isfinite(float(iou[row])) else None
        gold_boxes = target.boxes.tolist() if target.boxes is not None else []
        records.append(
            EvalRecord(
                id=batch.ids[i],
                domain=batch.domains[i],
                dataset=batch.datasets[i],
                origin=batch.origins[i] if batch.origins else "real",
                labels=tuple(target.labels),
                gold=frozenset(target.answer),
                response=text,
                predicted=extract_answer(text, target.labels, synonyms),
                pred_boxes=[tuple(b) for b in _safe_boxes(text)],
                gold_boxes=[tuple(float(x) for x in b) for b in gold_boxes],
                rewards={k: float(v[row]) for k, v in scored.components.items()} | {"total": float(scored.total[row])},
                iou=iou_value,
            )
        )
    return records


def _safe_boxes(text: str) -> list:
    try:
        return parse_boxes(text)
    except Exception:  # noqa: BLE001 - a malformed box list is simply "no boxes" for reporting
        return []


__all__ = ["eval_records", "generate", "prediction_rows"]
