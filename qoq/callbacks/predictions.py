"""``qoq predict`` output: one JSONL line per prompt (reasoning, boxes, answer) and a readable print.

The module's ``predict_step`` returns rows made by :func:`prediction_row`; :class:`PredictionWriter`
(added by :class:`qoq.systems.PolicyOptimization` unless the trainer has one) gathers them at the end of
the run, writes the JSONL file and prints each prediction (the first ``print_max``) and the file's path.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from qoq.callbacks.traces import run_dir, to_jsonable, write_jsonl
from qoq.rl.rewards import extract_answer, extract_boxed, extract_reasoning, parse_boxes
from qoq.types import PromptBatch


def prediction_row(batch: PromptBatch, index: int, response: str, synonyms=None) -> dict[str, Any]:
    """One prediction: the prompt's id, domain and dataset, and what the response says.

    Args:
        batch: the batch the prompt came from.
        index: the prompt's position in ``batch``.
        response: the generated text.
        synonyms: label aliases (the reward function's), for reading the answer into the label set.

    Returns:
        id, domain, dataset, question, reasoning (``<think>`` content or None), boxes (``[[x1, y1, x2, y2],
        ...]`` in the pixels the model saw), answer (the ``\\boxed{}`` content or None), labels (the answer
        read into the prompt's closed label set; empty without one), gold (when the input had an answer),
        response (the whole text).
    """
    target = batch.targets[index]
    try:
        boxes = [list(b) for b in parse_boxes(response)]
    except Exception:  # noqa: BLE001 - a malformed box list is "no boxes" in a prediction
        boxes = []
    row = {
        "id": batch.ids[index],
        "domain": batch.domains[index],
        "dataset": batch.datasets[index],
        "question": batch.texts[index],
        "reasoning": extract_reasoning(response),
        "boxes": boxes,
        "answer": extract_boxed(response),
        "labels": sorted(extract_answer(response, target.labels, synonyms)) if target.labels else [],
        "response": response,
    }
    if target.answer:
        row["gold"] = list(target.answer)
    return row


class PredictionWriter(L.Callback):
    """Writes the rows ``predict_step`` returns to a JSONL file and prints them readably.

    Args:
        path: the output file; default: the data module's ``predict.out`` if set, else
            ``<run dir>/predictions/<inputs' name>.jsonl``.
        print_max: predictions printed at most (the file holds all of them).
    """

    def __init__(self, path: str | None = None, print_max: int = 10) -> None:
        self.path = path
        self.print_max = print_max
        self._rows: list[dict[str, Any]] = []
        self.last_path: Path | None = None

    def output_path(self, trainer: L.Trainer) -> Path:
        """Where this run's predictions go."""
        inputs = getattr(trainer.datamodule, "predict", None)
        if self.path or getattr(inputs, "out", None):
            return Path(self.path or inputs.out)
        return run_dir(trainer) / "predictions" / f"{getattr(inputs, 'name', 'predictions')}.jsonl"

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._rows = []

    def on_predict_batch_end(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._rows.extend(outputs or [])

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        from qoq.callbacks.evaluation import _all_gather_objects

        rows = [r for part in _all_gather_objects(self._rows) for r in part]
        self._rows = []
        if not trainer.is_global_zero:
            return
        path = self.output_path(trainer)
        write_jsonl(path, rows)
        self.last_path = path
        for row in rows[: self.print_max]:
            rank_zero_info(format_prediction(row))
        more = f" (first {self.print_max} shown)" if len(rows) > self.print_max else ""
        rank_zero_info(f"[qoq] {len(rows)} prediction(s) -> {path}{more}")


def format_prediction(row: dict[str, Any], width: int = 100) -> str:
    """A few readable lines of one prediction row."""
    answer = row["answer"] if row["answer"] is not None else "(no \\boxed{} answer)"
    if row.get("labels"):
        answer += f"  -> labels {row['labels']}"
    if "gold" in row:
        answer += f"  (gold {row['gold']})"
    reasoning = row["reasoning"] if row["reasoning"] is not None else "(no <think> block)"
    lines = [
        f"[qoq] {row['id']} ({row['domain']})",
        "  reasoning: " + textwrap.shorten(reasoning, width, placeholder=" ..."),
        f"  boxes: {to_jsonable(row['boxes']) or 'none'}",
        f"  answer: {answer}",
    ]
    return "\n".join(lines)


__all__ = ["PredictionWriter", "format_prediction", "prediction_row"]
