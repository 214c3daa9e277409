"""ClinicalMetricsCallback: feeds :class:`ClinicalMetrics` from validation/test steps, logs, reports.

Contract with the LightningModule: ``validation_step`` / ``test_step`` return a dict whose
``"eval_records"`` entry is a list of :class:`qoq.callbacks.metrics.EvalRecord` (one per evaluated
response). The module does nothing else for metrics; this callback counts, syncs, logs and writes the
report folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

import qoq
from qoq.callbacks.metrics import (
    ClinicalMetrics,
    EvalRecord,
    LabelSpace,
    label_space_from_records,
    merge_label_spaces,
)
from qoq.callbacks.report import console_tables, write_report
from qoq.callbacks.traces import run_dir
from qoq.loggers import publish


class ClinicalMetricsCallback(L.Callback):
    """Per-domain clinical metrics of validation and test runs, logged and written as a report.

    Each evaluated batch's records update a :class:`ClinicalMetrics` of the split ("val" or "test"). At
    epoch end the metric is computed (states summed over data-parallel ranks), logged with
    ``pl_module.log_dict`` under ``{split}/{metric}/...`` (e.g. ``test/macro_f1/overall``), and, for
    ``trainer.validate`` / ``trainer.test`` runs (and every validation of ``fit`` when
    ``report_every_validation``), the records of all ranks are gathered and global rank 0 writes the
    report folder (:func:`qoq.callbacks.report.write_report`). Sanity-check batches are ignored.

    Without ``label_space``, the label space is taken from the records themselves (each carries its
    dataset's closed label set), united over ranks at epoch end; records are then held until epoch end.

    Args:
        label_space: domain -> dataset -> closed label set; None infers it from the records.
        report: write report folders at all.
        report_every_validation: also write one after every validation during ``fit``.
        report_dir: parent folder of the reports; default ``<run folder>/reports``. Each report goes to
            ``<report_dir>/<split>-step<global_step>`` (``-<name>`` added for a set of the data module's
            own, e.g. ``test_manifests``).
        generation: how evaluation responses are generated, for the report; None describes the
            module's ``eval_sampling`` (a :class:`qoq.types.SamplingParams`) if it has one.
        undefined_labels: see :class:`ClinicalMetrics` ("zero" or "skip").
    """

    def __init__(
        self,
        label_space: dict[str, dict[str, list[str]]] | None = None,
        report: bool = True,
        report_every_validation: bool = False,
        report_dir: str | None = None,
        generation: str | None = None,
        undefined_labels: Literal["zero", "skip"] = "zero",
    ) -> None:
        self.label_space = label_space
        self.report = report
        self.report_every_validation = report_every_validation
        self.report_dir = report_dir
        self.generation = generation
        self.undefined_labels = undefined_labels
        self.results: dict[str, dict[str, float]] = {}  # split -> the last computed names
        self.last_report: Path | None = None
        self._metric: dict[str, ClinicalMetrics | None] = {}
        self._pending: dict[str, list[EvalRecord]] = {}  # records not yet counted (no label space yet)
        self._kept: dict[str, list[EvalRecord]] = {}  # records kept for the report
        self._reporting: dict[str, bool] = {}
        self._checkpoint_step: int | None = None  # global step of the checkpoint a test / validate loaded

    # ------------------------------------------------------------------ hooks
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Remember the checkpoint's step: ``qoq test --ckpt_path`` names its report after it."""
        self._checkpoint_step = checkpoint.get("global_step")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start counting the validation split."""
        self._start("val", trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start counting the test split."""
        self._start("test", trainer, pl_module)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                *args: Any, **kwargs: Any) -> None:  # fmt: skip
        """Count the batch's evaluation records (batch, batch_idx, dataloader_idx unused)."""
        if not trainer.sanity_checking:
            self._count("val", outputs, pl_module)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any,
                          **kwargs: Any) -> None:  # fmt: skip
        """Count the batch's evaluation records."""
        self._count("test", outputs, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute, log and (if due) report the validation split."""
        if not trainer.sanity_checking:
            self._finish("val", trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Compute, log and (if due) report the test split."""
        self._finish("test", trainer, pl_module)

    # ------------------------------------------------------------------ steps
    def _start(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = None
        if self.label_space is not None:
            metric = self._new_metric(self.label_space, split).to(pl_module.device)
        self._metric[split] = metric
        self._pending[split] = []
        self._kept[split] = []
        fn = trainer.state.fn
        self._reporting[split] = self.report and (
            fn in (TrainerFn.VALIDATING, TrainerFn.TESTING)
            or (fn == TrainerFn.FITTING and self.report_every_validation)
        )
        if self._reporting[split] and fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            # the report's tables are printed instead of Lightning's table of every raw metric
            (trainer.test_loop if fn == TrainerFn.TESTING else trainer.validate_loop).verbose = False

    def _count(self, split: str, outputs: Any, pl_module: L.LightningModule) -> None:
        if not isinstance(outputs, Mapping) or "eval_records" not in outputs:
            step = "validation_step" if split == "val" else "test_step"
            raise TypeError(
                f"ClinicalMetricsCallback: {type(pl_module).__name__}'s {step} must return a dict with "
                f"'eval_records' (a list of EvalRecord); got {type(outputs).__name__}"
            )
        records = list(outputs["eval_records"])
        bad = [type(r).__name__ for r in records if not isinstance(r, EvalRecord)]
        if bad:
            raise TypeError(f"ClinicalMetricsCallback: 'eval_records' must hold EvalRecord, got {bad[0]}")
        metric = self._metric[split]
        if metric is None:
            self._pending[split].extend(records)
        else:
            metric.update(records)
        if self._reporting[split]:
            self._kept[split].extend(records)

    def _finish(self, split: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metric = self._metric[split]
        if metric is None:  # label space from the records of every rank
            spaces = _all_gather_objects(label_space_from_records(self._pending[split]))
            space = merge_label_spaces(spaces)
            if not space:  # no rank evaluated anything
                return
            metric = self._new_metric(space, split).to(pl_module.device)
            metric.update(self._pending[split])
            self._pending[split] = []
        results = metric.compute()  # synced over ranks: identical everywhere, no sync_dist needed
        self.results[split] = results
        if results:
            pl_module.log_dict(results, sync_dist=False)
        if self._reporting[split]:
            records = [r for part in _all_gather_objects(self._kept[split]) for r in part]
            if trainer.is_global_zero:
                self.last_report = write_report(
                    self._report_path(trainer, split),
                    results,
                    records,
                    split=split,
                    generation=self.generation or _describe_generation(pl_module),
                    checkpoint=trainer.ckpt_path,
                    run_info=_run_info(trainer, pl_module, self._step(trainer)),
                )
                rank_zero_info(f"{console_tables(self.last_report / 'summary.md')}\n[qoq] report: {self.last_report}")
                for name in ("domains.png", "summary.md"):
                    publish(trainer, self.last_report / name, f"{split}/{name.split('.')[0]}")
        self._metric[split] = None
        self._kept[split] = []

    def _new_metric(self, space: LabelSpace, split: str) -> ClinicalMetrics:
        return ClinicalMetrics(space, split=split, undefined_labels=self.undefined_labels)

    def _report_path(self, trainer: L.Trainer, split: str) -> Path:
        root = Path(self.report_dir) if self.report_dir else run_dir(trainer) / "reports"
        own_set = getattr(trainer.datamodule, "eval_set_name", lambda split: None)(split)
        return root / (f"{split}-step{self._step(trainer)}" + (f"-{own_set}" if own_set else ""))

    def _step(self, trainer: L.Trainer) -> int:
        """The evaluated weights' optimizer step (outside fit the trainer's own step is 0)."""
        return trainer.global_step or self._checkpoint_step or 0


def _all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every data-parallel rank (a one-element list outside distributed runs)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _describe_generation(pl_module: L.LightningModule) -> str:
    params = getattr(pl_module, "eval_sampling", None)
    if params is None or not hasattr(params, "temperature"):
        return "unspecified"
    if params.temperature == 0:
        return f"greedy, max_new_tokens={params.max_new_tokens}"
    return (
        f"sampled, seed {params.seed}, T={params.temperature}, top_p={params.top_p}, top_k={params.top_k}, "
        f"n={params.n}, max_new_tokens={params.max_new_tokens}"
    )


def _run_info(trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> dict[str, Any]:
    return {
        "module": type(pl_module).__name__,
        "stage": trainer.state.fn.value if trainer.state.fn else None,
        "global_step": step,
        "epoch": trainer.current_epoch,
        "world_size": trainer.world_size,
        "qoq": qoq.__version__,
    }


__all__ = ["ClinicalMetricsCallback"]
