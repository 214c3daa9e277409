"""RunProgress: the progress of a run as a researcher watches it (step / max_steps, ETA, a few numbers)."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks.progress import ProgressBar

#: What the bar shows: label -> logged metric name (shown when the run logs it).
DEFAULT_METRICS: dict[str, str] = {
    "reward": "train/reward",
    "acc": "train/reward_accuracy",
    "format": "train/reward_format",
    "kl": "train/kl",
    "len": "train/response_length",
    "loss": "train/loss",
}


class RunProgress(ProgressBar):
    """Optimizer step out of ``max_steps`` with the ETA, seconds per step and the numbers that matter.

    In a terminal: a rich bar for training (and one per evaluation / prediction). Otherwise (a log file,
    CI): one plain line every ``every_n_steps`` optimizer steps and at the end, e.g.
    ``[qoq] step 40/80 | reward 0.312 | acc 0.190 | format 0.850 | kl 0.0021 | len 31.0 | 1.02 s/step | ETA 0:00:41``.

    Args:
        metrics: label -> logged metric name; default :data:`DEFAULT_METRICS` (those the run logs).
        every_n_steps: steps between plain lines; None: ``trainer.log_every_n_steps`` or a tenth of
            ``max_steps``, whichever is more.
        terminal: True for the rich bar, False for plain lines, None to ask whether stdout is a terminal.
    """

    def __init__(
        self, metrics: dict[str, str] | None = None, every_n_steps: int | None = None, terminal: bool | None = None
    ) -> None:
        super().__init__()
        self.metrics = dict(DEFAULT_METRICS if metrics is None else metrics)
        self.every_n_steps = every_n_steps
        self.terminal = terminal
        self._enabled = True
        self._progress: Any = None  # rich.progress.Progress while a bar is shown
        self._task: Any = None
        self._started: tuple[float, int] | None = None  # (time, step) when the bar started
        self._last_line = -1
        self._eval_task: Any = None
        self._nested = False  # the evaluation bar sits below the training bar (validation inside fit)

    # ------------------------------------------------------------------ ProgressBar API
    def disable(self) -> None:  # noqa: D102
        self._enabled = False

    def enable(self) -> None:  # noqa: D102
        self._enabled = True

    @property
    def is_enabled(self) -> bool:  # noqa: D102
        return self._enabled and self.trainer.is_global_zero

    def _rich(self) -> bool:
        return sys.stdout.isatty() if self.terminal is None else self.terminal

    # ------------------------------------------------------------------ numbers
    def line(self, trainer: L.Trainer) -> str:
        """The step, the shown metrics, s/step and ETA, as one plain line."""
        total = _max_steps(trainer)
        step = trainer.global_step
        parts = [f"step {step}/{total if total else '?'}"]
        metrics = trainer.callback_metrics
        for label, name in self.metrics.items():
            if name in metrics:
                value = float(metrics[name])
                if math.isfinite(value):
                    parts.append(f"{label} {_number(value)}")
        rate = self._seconds_per_step(step)
        if rate is not None:
            parts.append(f"{rate:.2f} s/step")
            if total:
                parts.append(f"ETA {_clock(rate * max(0, total - step))}")
        return " | ".join(parts)

    def _seconds_per_step(self, step: int) -> float | None:
        if self._started is None or step <= self._started[1]:
            return None
        return (time.monotonic() - self._started[0]) / (step - self._started[1])

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._started = (time.monotonic(), trainer.global_step)
        self._last_line = trainer.global_step
        if self.is_enabled and self._rich():
            self._open(trainer, "train", _max_steps(trainer) or None, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:  # noqa: D102
        if not self.is_enabled:
            return
        step = trainer.global_step
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=self.line(trainer).split(" | ", 1)[-1])
            return
        every = self.every_n_steps or max(trainer.log_every_n_steps or 1, math.ceil(_max_steps(trainer) / 10))
        if step - self._last_line >= every:
            self._last_line = step
            print(f"[qoq] {self.line(trainer)}", flush=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._close()
        if self.is_enabled and not self._rich() and trainer.global_step != self._last_line:
            print(f"[qoq] {self.line(trainer)}", flush=True)

    # ------------------------------------------------------------------ evaluation and prediction
    def _eval_start(self, trainer: L.Trainer, what: str, totals: list[int | float]) -> None:
        if self.is_enabled and self._rich() and not trainer.sanity_checking:
            total = sum(t for t in totals if math.isfinite(t))
            self._nested = self._progress is not None
            self._open(trainer, what, total or None, 0)

    def _eval_batch(self, trainer: L.Trainer) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.advance(self._eval_task)

    def _eval_end(self) -> None:
        if self._eval_task is not None and self._nested:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None
        else:
            self._close()

    def on_validation_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._eval_start(trainer, "validate", trainer.num_val_batches)

    def on_test_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._eval_start(trainer, "test", trainer.num_test_batches)

    def on_predict_start(self, trainer, pl_module) -> None:  # noqa: D102
        self._eval_start(trainer, "predict", trainer.num_predict_batches)

    def _on_eval_batch_end(self, trainer, pl_module, *args: Any, **kwargs: Any) -> None:
        self._eval_batch(trainer)

    def _on_eval_end(self, trainer, pl_module) -> None:
        self._eval_end()

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _on_eval_batch_end
    on_validation_end = on_test_end = on_predict_end = _on_eval_end

    # ------------------------------------------------------------------ rich
    def _open(self, trainer: L.Trainer, what: str, total: int | None, completed: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False,
            )
            self._progress.start()
        task = self._progress.add_task(what, total=total, completed=completed, info="")
        if what == "train":
            self._task = task
        else:
            self._eval_task = task

    def _close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._task, self._eval_task = None, None, None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._close()


def _max_steps(trainer: L.Trainer) -> int:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else 0


def _number(value: float) -> str:
    if value and abs(value) < 0.01:
        return f"{value:.2e}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


__all__ = ["DEFAULT_METRICS", "RunProgress"]
