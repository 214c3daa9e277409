"""The default logger of a qoq run: Lightning's CSVLogger, except that a run that continues from a
checkpoint (``--ckpt_path``: a resumed fit, or ``qoq test`` / ``validate`` in the training run's folder)
appends to the folder's ``metrics.csv`` instead of deleting it."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only


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
        if self._experiment is not None or not self.keep_existing or rank_zero_only.rank != 0:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
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


__all__ = ["RunLogger"]
