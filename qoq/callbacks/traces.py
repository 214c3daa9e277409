"""JSONL traces: one line per evaluated sample (reports) and sampled training rollouts (callback).

Traces hold what the policy saw and said about a prompt (ids, names, texts, labels, boxes, rewards),
never patient identifiers: records carry none, and nothing here reads image or DICOM headers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch

from qoq.callbacks.metrics import EvalRecord


def to_jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: tensors and sets become lists, non-finite floats become None.

    Args:
        value: nested dicts / lists / tuples / sets of str, numbers, bools, None and tensors.

    Returns:
        The JSON-ready value (sets are sorted, so output is deterministic).
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


def record_to_json(record: EvalRecord) -> dict[str, Any]:
    """One ``traces.jsonl`` line: the evaluated sample, with the answers as sorted lists.

    Args:
        record: an evaluated sample.

    Returns:
        prompt_id, domain, dataset, origin, response, predicted, gold, exact_match, pred_boxes,
        gold_boxes, rewards (NaN terms as null), iou (null when not annotated).
    """
    return to_jsonable(
        {
            "prompt_id": record.id,
            "domain": record.domain,
            "dataset": record.dataset,
            "origin": record.origin,
            "response": record.response,
            "predicted": record.predicted,
            "gold": record.gold,
            "exact_match": record.predicted == record.gold,
            "pred_boxes": record.pred_boxes,
            "gold_boxes": record.gold_boxes,
            "rewards": record.rewards,
            "iou": record.iou,
        }
    )


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]], append: bool = False) -> int:
    """Write rows as JSON lines (values made JSON-ready by :func:`to_jsonable`).

    Args:
        path: output file; parent folders are created.
        rows: the rows.
        append: append to the file instead of replacing it.

    Returns:
        The number of lines written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(to_jsonable(row), ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n


def write_traces(path: str | Path, records: Iterable[EvalRecord]) -> int:
    """Write one ``traces.jsonl`` line per evaluated sample (:func:`record_to_json`).

    Args:
        path: output file.
        records: evaluated samples.

    Returns:
        The number of lines written.
    """
    return write_jsonl(path, (record_to_json(r) for r in records))


def run_dir(trainer: L.Trainer) -> Path:
    """The run's folder, ``trainer.default_root_dir``, whatever the logger (:mod:`qoq.runs`).

    Unlike ``trainer.log_dir``, which broadcasts from rank 0 (a collective), this is safe to call on one
    rank only.
    """
    return Path(trainer.default_root_dir)


class RolloutTraceWriter(L.Callback):
    """Appends sampled training rollouts to a JSONL file.

    After each training batch, if the module's ``last_rollout_trace`` (a list of JSON-ready dicts, or
    None) is set and at least ``every_n_steps`` optimizer steps passed since the last write, its first
    ``max_rows`` rows are appended, each with ``global_step`` added. The module decides what a row holds
    (prompt id, domain, response, reward, advantage, ...) and must not put patient identifiers in it.
    Only global rank 0 writes (its own rollouts). A fresh fit starts a new file; a resumed one
    (``--ckpt_path``) appends.

    Args:
        every_n_steps: minimum optimizer steps between two writes.
        max_rows: rows written per step at most; None writes the whole trace.
        dirpath: output folder; default: the run folder (``trainer.default_root_dir``).
        filename: output file name.
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        max_rows: int | None = 16,
        dirpath: str | None = None,
        filename: str = "rollouts.jsonl",
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        if max_rows is not None and max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {max_rows}")
        self.every_n_steps = every_n_steps
        self.max_rows = max_rows
        self.dirpath = dirpath
        self.filename = filename
        self._last_step: int | None = None

    def path(self, trainer: L.Trainer) -> Path:
        """The output file for ``trainer``'s run."""
        return (Path(self.dirpath) if self.dirpath else run_dir(trainer)) / self.filename

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start a new file unless the fit continues a checkpoint."""
        if trainer.is_global_zero and trainer.ckpt_path is None:
            self.path(trainer).unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed fit drops the rows its killed predecessor wrote after the checkpoint: it redoes them."""
        path = self.path(trainer)
        if trainer.is_global_zero and trainer.ckpt_path is not None and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
            kept = [line for line in lines if json.loads(line)["global_step"] <= trainer.global_step]
            if len(kept) < len(lines):
                path.write_text("".join(kept), encoding="utf-8")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        """Write the module's latest rollout trace if present and due."""
        trace = getattr(pl_module, "last_rollout_trace", None)
        step = trainer.global_step
        if not trace or (self._last_step is not None and step - self._last_step < self.every_n_steps):
            return
        self._last_step = step
        if trainer.is_global_zero:
            rows = trace if self.max_rows is None else trace[: self.max_rows]
            write_jsonl(self.path(trainer), ({"global_step": step, **row} for row in rows), append=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Hand the rollout samples to the loggers that take tables or files (:func:`qoq.loggers.publish`)."""
        path = self.path(trainer)
        if trainer.is_global_zero and path.is_file():
            from qoq.loggers import publish

            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[-200:]]
            publish(trainer, path, "rollouts", rows=rows)


__all__ = ["RolloutTraceWriter", "record_to_json", "run_dir", "to_jsonable", "write_jsonl", "write_traces"]
