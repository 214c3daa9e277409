"""The evaluation report folder: summary, metrics table, plots and per-sample traces.

``write_report`` turns the names of :meth:`qoq.callbacks.metrics.ClinicalMetrics.compute` and the
evaluated records into::

    summary.md            overall / per-domain / per-dataset tables, worst domain, real vs synthetic
                          counts, generation mode, checkpoint, notes on the paper's accuracy
    metrics.csv           name,value rows (every metric name)
    domains.png           per-domain macro-F1 and balanced accuracy (real samples; a second panel with
                          synthetic samples included when there are any)
    confusion_<domain>_<dataset>.png   per single-label dataset: gold x predicted counts
    f1_<domain>_<dataset>.png          per multi-label dataset: per-label F1
    traces.jsonl          one line per evaluated sample (:func:`qoq.callbacks.traces.record_to_json`)

Plots use matplotlib's object API (``matplotlib.figure.Figure``, Agg canvas): no global backend state.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from qoq.callbacks.metrics import CONFUSION_EXTRA_COLUMNS, SCORES, WITH_SYNTHETIC, ClinicalMetrics, EvalRecord
from qoq.callbacks.traces import write_traces

#: How reports title each score; the paper's accuracy is flagged as such.
SCORE_TITLES: dict[str, str] = {
    "macro_f1": "macro-F1",
    "balanced_accuracy": "balanced accuracy",
    "ovr_accuracy": "ovr_accuracy (paper)",
    "iou": "IoU",
}

_NOTES = """\
- Scores use real samples only; "incl. synthetic" tables add the synthetic ones. Synthetic samples are
  generated stand-ins, never clinical evidence.
- macro-F1 and balanced accuracy (mean per-label recall) are one-vs-rest over each dataset's closed label
  set; a label that is never predicted scores F1 0. Domain = unweighted mean over its datasets, overall =
  unweighted mean over domains.
- ovr_accuracy (paper) is the mean per-label (TP + TN) / N that the QoQ-Med paper reports as
  "accuracy" / "balanced accuracy". True negatives inflate it (a model that never answers scores
  (L - 1) / L on a single-label dataset of L labels); it is here for comparison with the paper only.
- IoU is the mean over box/mask-annotated samples of the best predicted box's IoU.
- Labels taken from file headers are not clinical ground truth.
"""


def write_report(
    out_dir: str | Path,
    metrics: Mapping[str, float],
    records: Sequence[EvalRecord],
    *,
    split: str,
    generation: str,
    checkpoint: str | None = None,
    run_info: Mapping[str, Any] | None = None,
) -> Path:
    """Write the evaluation report folder.

    Args:
        out_dir: the report folder (created; files in it are replaced).
        metrics: ``{split}/{metric}/...`` names and values, as :meth:`ClinicalMetrics.compute` returns.
        records: every evaluated sample (all ranks gathered).
        split: the split the names are prefixed with (e.g. "test").
        generation: how responses were generated, e.g. "greedy" or "sampled, seed 0, T=1.0".
        checkpoint: the evaluated checkpoint path, or None.
        run_info: further facts for the summary (step, epoch, devices, ...), written as a list.

    Returns:
        The report folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _parse(metrics, split)
    with (out / "metrics.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "value"])
        writer.writerows([name, repr(float(value))] for name, value in metrics.items())
    write_traces(out / "traces.jsonl", records)
    (out / "summary.md").write_text(
        _summary(table, records, split, generation, checkpoint, dict(run_info or {})), encoding="utf-8"
    )
    _plot_domains(table, out / "domains.png")
    if records:
        counts = ClinicalMetrics.from_records(records, split=split, sync_on_compute=False)
        for domain, dataset in counts.datasets:
            stem = f"{_slug(domain)}_{_slug(dataset)}"
            if counts.is_multi_label(dataset, domain):
                _plot_label_f1(
                    counts.label_scores(dataset, domain), f"{domain} / {dataset}", out / f"f1_{stem}.png"
                )
            else:
                labels, matrix = counts.confusion(dataset, domain)
                _plot_confusion(
                    labels, matrix.tolist(), f"{domain} / {dataset}", out / f"confusion_{stem}.png"
                )
    return out


def console_tables(summary: str | Path) -> str:
    """The overall and per-domain tables of a ``summary.md`` (real samples), for the console.

    Args:
        summary: the ``summary.md`` file.

    Returns:
        Its ``## Overall (real samples)`` and ``## Per domain (real samples)`` sections (or the note that
        nothing was scored), as written there (3 decimals).
    """
    keep, out = False, []
    for line in Path(summary).read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            keep = line in ("## Overall (real samples)", "## Per domain (real samples)")
            if keep and out:
                out.append("")
        elif line.startswith("No real or synthetic samples"):
            out.append(line)
        if keep and line.strip():
            out.append(line)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- tables
class _Table:
    """The metric names of one split, parsed: score -> level -> value."""

    def __init__(self) -> None:
        self.overall: dict[str, float] = {}  # "macro_f1" / "macro_f1_with_synthetic" -> value
        self.worst: dict[str, float] = {}
        self.domain: dict[tuple[str, str], float] = {}  # (score, domain) -> value
        self.dataset: dict[tuple[str, str, str], float] = {}  # (score, domain, dataset) -> value
        self.domains: list[str] = []
        self.datasets: list[tuple[str, str]] = []

    def get(self, score: str, *where: str) -> float | None:
        if len(where) == 1:
            return self.domain.get((score, where[0]))
        return self.dataset.get((score, *where))


def _parse(metrics: Mapping[str, float], split: str) -> _Table:
    table = _Table()
    for name, value in metrics.items():
        parts = name.split("/")
        if len(parts) < 3 or parts[0] != split:
            continue
        score, rest, value = parts[1], parts[2:], float(value)
        if rest == ["overall"]:
            table.overall[score] = value
        elif rest == ["worst_domain"]:
            table.worst[score] = value
        elif len(rest) == 1:
            table.domain[(score, rest[0])] = value
            if rest[0] not in table.domains:
                table.domains.append(rest[0])
        elif len(rest) == 2:
            table.dataset[(score, rest[0], rest[1])] = value
            if (rest[0], rest[1]) not in table.datasets:
                table.datasets.append((rest[0], rest[1]))
    return table


def _fmt(value: float | None, count: bool = False) -> str:
    if value is None:
        return "-"
    return f"{int(value)}" if count else f"{value:.3f}"


def _summary(
    table: _Table,
    records: Sequence[EvalRecord],
    split: str,
    generation: str,
    checkpoint: str | None,
    run_info: dict[str, Any],
) -> str:
    n_real = sum(r.origin == "real" for r in records)
    lines = [
        f"# qoq evaluation report: {split}",
        "",
        f"- checkpoint: {checkpoint or '(none: the model as it was in memory)'}",
        f"- generation: {generation}",
        f"- evaluated samples: {len(records)} ({n_real} real, {len(records) - n_real} synthetic)",
        *(f"- {key}: {value}" for key, value in run_info.items()),
        "",
    ]
    for suffix, title in (("", "real samples"), (WITH_SYNTHETIC, "incl. synthetic samples")):
        if not any(s + suffix in table.overall for s in SCORES):
            continue
        lines += [f"## Overall ({title})", "", "| metric | overall | worst domain |", "|---|---|---|"]
        for score in SCORES:
            key = score + suffix
            if key not in table.overall:
                continue
            worst = [d for d in table.domains if table.get(key, d) == table.worst.get(key)]
            worst_txt = (
                f"{_fmt(table.worst.get(key))} ({', '.join(worst)})" if worst else _fmt(table.worst.get(key))
            )
            lines.append(f"| {SCORE_TITLES[score]} | {_fmt(table.overall[key])} | {worst_txt} |")
        lines.append("")
        head = "| n real | n synthetic | " + " | ".join(SCORE_TITLES[s] for s in SCORES) + " |"
        rule = "|---" * (len(SCORES) + 2)
        lines += [f"## Per domain ({title})", "", "| domain " + head, rule + "|---|"]
        for domain in table.domains:
            if not any(table.get(s + suffix, domain) is not None for s in SCORES):
                continue
            cells = [_fmt(table.get(f"n_{o}", domain), count=True) for o in ("real", "synthetic")]
            cells += [_fmt(table.get(s + suffix, domain)) for s in SCORES]
            lines.append(f"| {domain} | " + " | ".join(cells) + " |")
        lines += ["", f"## Per dataset ({title})", "", "| domain | dataset " + head, rule + "|---|---|"]
        for domain, dataset in table.datasets:
            if not any(table.get(s + suffix, domain, dataset) is not None for s in SCORES):
                continue
            cells = [_fmt(table.get(f"n_{o}", domain, dataset), count=True) for o in ("real", "synthetic")]
            cells += [_fmt(table.get(s + suffix, domain, dataset)) for s in SCORES]
            lines.append(f"| {domain} | {dataset} | " + " | ".join(cells) + " |")
        lines.append("")
    if not table.overall:
        lines += ["No real or synthetic samples were scored.", ""]
    lines += ["## Notes", "", _NOTES]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- plots
def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unnamed"


def _plot_domains(table: _Table, path: Path, few: int = 10) -> None:
    """Per-domain macro-F1 and balanced accuracy: each bar labelled with its value ("n/a" when not scored),
    each domain with its sample count; domains with fewer than ``few`` samples drawn hatched and faint."""
    panels = [
        (s, t)
        for s, t in (("", "real samples"), (WITH_SYNTHETIC, "incl. synthetic samples"))
        if f"macro_f1{s}" in table.overall
    ]
    fig = Figure(
        figsize=(max(6.0, 1.3 * len(table.domains) + 2.5), 3.8 * max(1, len(panels))), layout="constrained"
    )
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    if not panels:
        axes[0].text(0.5, 0.5, "no scored samples", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, (suffix, title) in zip(axes, panels, strict=False):
        domains = [d for d in table.domains if table.get(f"macro_f1{suffix}", d) is not None]
        counts = [_count(table, d, suffix) for d in domains]
        x = range(len(domains))
        for shift, score, color in ((-0.2, "macro_f1", "C0"), (0.2, "balanced_accuracy", "C1")):
            values = [table.get(score + suffix, d) for d in domains]
            bars = ax.bar([i + shift for i in x], [v or 0.0 for v in values], width=0.4, color=color,
                          label=SCORE_TITLES[score])
            for bar, value, n in zip(bars, values, counts, strict=True):
                if n < few:
                    bar.set_alpha(0.45)
                    bar.set_hatch("//")
                ax.text(bar.get_x() + bar.get_width() / 2, (value or 0.0) + 0.015,
                        "n/a" if value is None else f"{value:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(x), [f"{d}\nn={n}" for d, n in zip(domains, counts, strict=True)], fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("score (0 = worst, 1 = best)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"per domain ({title}); hatched: fewer than {few} samples")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.savefig(path, dpi=100)


def _count(table: _Table, domain: str, suffix: str) -> int:
    """Samples scored in a domain (real ones; with ``suffix`` also the synthetic ones)."""
    real = table.get("n_real", domain) or 0
    return int(real + ((table.get("n_synthetic", domain) or 0) if suffix else 0))


def _plot_confusion(labels: list[str], matrix: list[list[int]], title: str, path: Path) -> None:
    columns = labels + list(CONFUSION_EXTRA_COLUMNS)
    fig = Figure(figsize=(2 + 0.6 * len(columns), 1.5 + 0.5 * len(labels)), layout="constrained")
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            color = "white" if value > top / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", fontsize="small", color=color)
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{title} (all samples)")
    fig.savefig(path, dpi=100)


def _plot_label_f1(scores: dict[str, dict[str, float]], title: str, path: Path) -> None:
    labels = list(scores)
    fig = Figure(figsize=(max(5.0, 0.5 * len(labels) + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(range(len(labels)), [scores[label]["f1"] for label in labels])
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title(f"{title}: per-label F1 (all samples)")
    fig.savefig(path, dpi=100)


__all__ = ["SCORE_TITLES", "console_tables", "write_report"]
