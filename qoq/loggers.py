"""The default logger of a qoq run: Lightning's CSVLogger, except that a run that continues from a
checkpoint (``--ckpt_path``: a resumed fit, or ``qoq test`` / ``validate`` in the training run's folder)
appends to the folder's ``metrics.csv`` instead of deleting it; and :func:`publish`, which hands the
run's figures and samples to whatever other loggers are configured."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn


class RunLogger(CSVLogger):
    """CSV metrics in the run folder that survive a resume.

    Args:
        save_dir: parent folder of the logs.
        name: sub-folder of ``save_dir``; "" for none.
        version: sub-folder of ``name``; "" for none, None for the next free ``version_N``.
        keep_existing: append to an existing ``metrics.csv`` (its header is kept and widened when new
            metrics appear). When False, Lightning's own behaviour: the file is replaced.
        resume_step: the global step of the checkpoint a fit resumes from: kept rows of that step and
            later ones are dropped (the killed run logged them after its last checkpoint; the resumed run
            logs them again), so every step has one row. None keeps every row (``qoq test`` / ``validate``).
        flush_logs_every_n_steps: how often rows are written to disk.
    """

    def __init__(
        self,
        save_dir: str = ".",
        name: str = "",
        version: int | str | None = "",
        keep_existing: bool = False,
        resume_step: int | None = None,
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(save_dir, name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps)
        self.keep_existing = keep_existing
        self.resume_step = resume_step

    @property
    def experiment(self):  # noqa: D102 - CSVLogger's writer
        path = Path(self.log_dir) / "metrics.csv"
        if self._experiment is None and not self.keep_existing and rank_zero_only.rank == 0 and path.is_file():
            rank_zero_info(f"[qoq] {path} of an earlier run is replaced (--ckpt_path continues a run's file)")
        if self._experiment is not None or not self.keep_existing or rank_zero_only.rank != 0:
            return super().experiment
        if not path.is_file():
            return super().experiment
        kept = path.with_name("metrics.csv.kept")
        path.replace(kept)  # Lightning's writer deletes metrics.csv when it starts
        try:
            writer = super().experiment
        finally:
            kept.replace(path)
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        header, rows = (rows[0], rows[1:]) if rows else ([], [])
        if self.resume_step is not None and "step" in header:
            at = header.index("step")
            kept_rows = [r for r in rows if not r[at] or int(float(r[at])) < self.resume_step]
            with open(path, "w", newline="") as fh:
                csv.writer(fh).writerows([header, *kept_rows])
        writer.metrics_keys = list(header)
        return writer


def publish(trainer: Any, path: str | Path, key: str, rows: Sequence[Mapping[str, Any]] | None = None) -> None:
    """Hand a file the run wrote (a figure, a report, rollout samples) to every logger that takes it.

    The file stays in the run folder; loggers get a copy in their own form: W&B (and any logger with
    ``log_image`` / ``log_table``) an image or a table, TensorBoard an image, MLflow an artifact. CSV
    loggers take nothing. A logger that fails is named in a warning; the run goes on.

    Args:
        trainer: the trainer (its ``loggers`` and ``global_step``).
        path: the file.
        key: the name it is logged under, e.g. ``"reward_curve"``.
        rows: the file's rows, for loggers that take tables (values that are not scalars become JSON).
    """
    path = Path(path)
    image = path.suffix.lower() == ".png"
    for logger in getattr(trainer, "loggers", []):
        if isinstance(logger, CSVLogger):
            continue
        try:
            if image and hasattr(logger, "log_image"):
                logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
            elif image and isinstance(logger, TensorBoardLogger):
                import numpy as np
                from PIL import Image

                pixels = np.asarray(Image.open(path).convert("RGB"))  # [H, W, 3]
                logger.experiment.add_image(key, pixels, trainer.global_step, dataformats="HWC")
            if rows and hasattr(logger, "log_table"):
                columns = list(dict.fromkeys(k for row in rows for k in row))
                data = [[_scalar(row.get(c)) for c in columns] for row in rows]
                logger.log_table(key=key, columns=columns, data=data)
            if isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(path))
        except Exception as err:  # noqa: BLE001 - a logger that cannot take a copy must not end the run
            rank_zero_warn(f"{type(logger).__name__} did not take {path.name}: {type(err).__name__}: {err}")


def _scalar(value: Any) -> Any:
    return value if value is None or isinstance(value, (str, int, float, bool)) else json.dumps(value)


__all__ = ["RunLogger", "publish"]
