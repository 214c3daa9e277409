"""``qoq compare RUN_DIR...``: runs side by side (their latest test reports and reward curves).

Reads each run folder's ``metrics.csv`` (training reward per step, per domain) and its latest
``reports/test-step<N>*/metrics.csv``, prints a table (overall scores, reward at the start and end of
training, per-domain macro-F1) and writes ``comparison.md`` and ``comparison.png`` (reward curves
overlaid; per-domain training reward; per-domain test macro-F1 side by side).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.figure import Figure

from qoq.callbacks.curves import moving_average

#: The overall scores a comparison shows: metric name -> column title.
OVERALL: dict[str, str] = {
    "macro_f1": "macro-F1",
    "balanced_accuracy": "bal. acc.",
    "iou": "IoU",
}


@dataclass
class RunSummary:
    """What one run folder says about itself.

    Attributes:
        name: the folder's name.
        steps: training steps with a logged reward.
        reward: ``train/reward`` per step.
        domain_reward: domain -> step -> ``train/reward/<domain>``.
        report: the latest test report folder, or None.
        scores: the report's ``test/...`` metrics.
    """

    name: str
    steps: list[int] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    domain_reward: dict[str, dict[int, float]] = field(default_factory=dict)
    report: Path | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def reward_window(self, first: bool, share: float = 0.2) -> float | None:
        """Mean reward of the first / last ``share`` of the steps."""
        if not self.reward:
            return None
        w = max(1, int(len(self.reward) * share))
        part = self.reward[:w] if first else self.reward[-w:]
        return sum(part) / len(part)

    def domains(self) -> list[str]:
        """Domains with a test macro-F1."""
        return [k.split("/")[2] for k in self.scores if re.fullmatch(r"test/macro_f1/[^/]+", k)
                and k.split("/")[2] not in ("overall", "worst_domain")]


def read_run(folder: str | Path) -> RunSummary:
    """Read one run folder.

    Raises:
        FileNotFoundError: the folder has neither ``metrics.csv`` nor a report.
    """
    folder = Path(folder)
    run = RunSummary(folder.name.rstrip("/") or str(folder))
    metrics = folder / "metrics.csv"
    if metrics.is_file():
        with metrics.open(newline="") as fh:
            for row in csv.DictReader(fh):
                value = _float(row.get("train/reward"))
                if value is None:
                    continue
                step = int(float(row.get("step") or len(run.steps)))
                run.steps.append(step)
                run.reward.append(value)
                for key, raw in row.items():
                    if key and key.startswith("train/reward/") and _float(raw) is not None:
                        run.domain_reward.setdefault(key.split("/", 2)[2], {})[step] = _float(raw)
    reports = sorted((folder / "reports").glob("test-step*"), key=_report_step)
    if reports:
        run.report = reports[-1]
        with (run.report / "metrics.csv").open(newline="") as fh:
            run.scores = {r["name"]: float(r["value"]) for r in csv.DictReader(fh)}
    if not metrics.is_file() and run.report is None:
        raise FileNotFoundError(f"qoq compare: {folder} has no metrics.csv and no reports/test-step*/ (not a run folder?)")
    return run


def table(runs: list[RunSummary]) -> str:
    """The comparison as a markdown table (3 decimals; "-" where a run has no value)."""
    domains = list(dict.fromkeys(d for r in runs for d in r.domains()))
    head = ["run", "steps", "reward start", "reward end", *OVERALL.values(), *(f"F1 {d}" for d in domains)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in runs:
        cells = [r.name, str(len(r.steps)), _fmt(r.reward_window(True)), _fmt(r.reward_window(False))]
        cells += [_fmt(r.scores.get(f"test/{k}/overall")) for k in OVERALL]
        cells += [_fmt(r.scores.get(f"test/macro_f1/{d}")) for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: list[RunSummary], path: Path) -> None:
    """Reward curves overlaid, per-domain training reward, per-domain test macro-F1 (one bar per run)."""
    domains = list(dict.fromkeys(d for r in runs for d in (*r.domain_reward, *r.domains())))
    fig = Figure(figsize=(max(8.0, 1.1 * len(domains) + 3), 10), layout="constrained")
    ax_reward, ax_domain, ax_f1 = fig.subplots(3, 1)
    for r in runs:
        if r.reward:
            line, = ax_reward.plot(r.steps, moving_average(r.reward), label=r.name)
            ax_reward.plot(r.steps, r.reward, color=line.get_color(), alpha=0.2, linewidth=0.8)
    ax_reward.set(title="training reward (moving average of 10; raw faint)", xlabel="optimizer step", ylabel="reward")
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(runs):
        for j, domain in enumerate(domains):
            points = sorted(r.domain_reward.get(domain, {}).items())
            if points:
                ax_domain.plot([s for s, _ in points], moving_average([v for _, v in points]), linestyle=styles[i % 4],
                               color=f"C{j % 10}", label=f"{domain} ({r.name})" if len(runs) > 1 else domain)
    ax_domain.set(title="training reward per domain (moving average; line style = run)", xlabel="optimizer step",
                  ylabel="reward")
    width = 0.8 / max(1, len(runs))
    for i, r in enumerate(runs):
        values = [r.scores.get(f"test/macro_f1/{d}") for d in domains]
        xs = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(domains))]
        ax_f1.bar(xs, [v or 0.0 for v in values], width=width, label=r.name)
        for x, v in zip(xs, values, strict=True):
            ax_f1.text(x, (v or 0.0) + 0.01, "-" if v is None else f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax_f1.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax_f1.set(title="test macro-F1 per domain (latest report; '-' = not evaluated)", ylabel="macro-F1", ylim=(0, 1.05))
    for ax in (ax_reward, ax_domain, ax_f1):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=100)


def compare(folders: list[str | Path], out: str | Path) -> tuple[str, Path]:
    """Compare run folders; writes ``<out>/comparison.md`` and ``<out>/comparison.png``.

    Returns:
        The table and the output folder.
    """
    runs = [read_run(f) for f in folders]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(runs)
    sources = "\n".join(f"- {r.name}: {r.report or 'no test report'}" for r in runs)
    (out / "comparison.md").write_text(f"# qoq comparison\n\n{text}\n\nReports:\n{sources}\n", encoding="utf-8")
    plot(runs, out / "comparison.png")
    return text, out


def main(argv: list[str]) -> int:
    """``qoq compare RUN_DIR RUN_DIR... [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="qoq compare",
        description="Two or more runs side by side: their latest test reports and reward curves.",
        epilog="example: qoq compare runs/demo runs/demo-grpo --out runs/compare",
    )
    parser.add_argument("runs", nargs="+", help="run folders (trainer.default_root_dir of each run)")
    parser.add_argument("--out", default="runs/compare", help="where comparison.md / .png go (default runs/compare)")
    args = parser.parse_args(argv)
    text, out = compare(args.runs, args.out)
    print(text)
    print(f"[qoq] comparison -> {out / 'comparison.md'}, {out / 'comparison.png'}")
    return 0


def _report_step(path: Path) -> tuple[int, float]:
    match = re.match(r"test-step(\d+)", path.name)
    return (int(match.group(1)) if match else -1, path.stat().st_mtime)


def _float(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


__all__ = ["RunSummary", "compare", "main", "read_run", "table"]
