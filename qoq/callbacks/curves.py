"""Learning curves: the training reward per step, printed at the end of a fit and plotted."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
from matplotlib.figure import Figure
from lightning.pytorch.utilities import rank_zero_info

from qoq.callbacks.traces import run_dir
from qoq.loggers import publish


class RewardCurve(L.Callback):
    """Record logged training scalars per step; at the end of ``fit`` print how the reward moved and plot it.

    The curve is callback state, so a resumed run continues the same curve.

    Args:
        keys: logged metrics to record (the first is the one summarised).
        window: fraction of the run averaged for the "start" and "end" figures.
        out_dir: where ``reward_curve.csv`` / ``reward_curve.png`` go; default: the run folder (``trainer.default_root_dir``).
    """

    def __init__(
        self,
        keys: tuple[str, ...] = ("train/reward", "train/reward_accuracy", "train/reward_format"),
        window: float = 0.2,
        out_dir: str | None = None,
    ) -> None:
        self.keys = tuple(keys)
        self.window = window
        self.out_dir = out_dir
        self.steps: list[int] = []
        self.values: dict[str, list[float]] = {k: [] for k in self.keys}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        metrics = trainer.callback_metrics
        if self.keys[0] not in metrics:
            return
        self.steps.append(int(trainer.global_step))
        for k in self.keys:
            self.values[k].append(float(metrics[k]) if k in metrics else float("nan"))

    def summary(self) -> dict[str, float]:
        """Mean of the first and last ``window`` of the main curve."""
        ys = self.values[self.keys[0]]
        if not ys:
            return {}
        w = max(1, int(len(ys) * self.window))
        return {"start": sum(ys[:w]) / w, "end": sum(ys[-w:]) / w, "steps": float(len(ys))}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        s = self.summary()
        rank_zero_info(
            f"[qoq] {self.keys[0]}: start {s['start']:.3f} -> end {s['end']:.3f} "
            f"(mean of first / last {self.window:.0%} of {int(s['steps'])} steps)"
        )
        out = Path(self.out_dir) if self.out_dir else run_dir(trainer)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "reward_curve.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", *self.keys])
            for i, step in enumerate(self.steps):
                writer.writerow([step, *(self.values[k][i] for k in self.keys)])
        self._plot(out / "reward_curve.png", run_dir(trainer).name)
        publish(trainer, out / "reward_curve.png", "reward_curve")

    def _plot(self, path: Path, run: str = "") -> None:
        """Each curve raw (faint) and as a moving average, titled with the run and its start -> end."""
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.subplots()
        for i, k in enumerate(self.keys):
            ys = self.values[k]
            if any(y == y for y in ys):  # not all NaN
                color = f"C{i}"
                ax.plot(self.steps, ys, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(self.steps, moving_average(ys), color=color, label=f"{k.removeprefix('train/')} (moving avg. of 10)")
        s = self.summary()
        ax.set_title(f"{run or 'run'}: {self.keys[0]} {s['start']:.3f} -> {s['end']:.3f} "
                     f"(first / last {self.window:.0%} of {int(s['steps'])} steps)", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward (faint: per step)")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.savefig(path, dpi=120)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": {k: list(v) for k, v in self.values.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = list(state_dict.get("steps", []))
        for k, v in state_dict.get("values", {}).items():
            self.values[k] = list(v)


def moving_average(ys: list[float], width: int = 10) -> list[float]:
    """Mean of the last ``width`` finite values at each point (NaN where there is none yet)."""
    out, acc = [], []
    for y in ys:
        acc.append(y)
        acc = acc[-width:]
        finite = [a for a in acc if a == a]
        out.append(sum(finite) / len(finite) if finite else float("nan"))
    return out
