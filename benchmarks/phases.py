"""Where a demo RL step spends its time: the per-phase timers of a short real ``qoq fit`` run.

Runs the demo configuration as a user would (``qoq fit --config configs/demo.yaml`` plus an overlay: the
tiny policy from scratch, ``init_policy_from: null``, a few steps), once with vLLM rollouts (the demo's
default) and once with HF ``generate`` (``configs/rollout/hf.yaml``), then reads ``<root>/metrics.csv``:
``time/{rollout,reward,logprobs,advantage,update,sync}`` per step, written by
:class:`qoq.systems.PolicyOptimization`. The first step (engine warm-up) is left out of the medians.

    python -m benchmarks.phases [--smoke] [--out results.json]
"""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

PHASES = ("rollout", "reward", "logprobs", "advantage", "update", "sync")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What is run.

    Attributes:
        steps: RL steps per run.
        variants: name -> extra config files (relative to the repository root) after ``configs/demo.yaml``.
        overlay: YAML text of the last config (fewer steps, no warm start).
        timeout: seconds allowed per run.
    """

    steps: int = 8
    variants: dict[str, tuple[str, ...]] = dataclasses.field(
        default_factory=lambda: {"vllm": (), "hf": ("configs/rollout/hf.yaml",)}
    )
    overlay: str = "model:\n  init_args:\n    init_policy_from: null\n"
    timeout: float = 900


FULL = Settings()
SMOKE = Settings(steps=2, variants={"vllm": ("configs/smoke.yaml",)}, timeout=300)


def read_phases(metrics_csv: Path) -> list[dict[str, float]]:
    """Per training step, the ``time/<phase>`` values found in a CSVLogger ``metrics.csv``.

    Raises:
        ValueError: the file has no ``time/`` column (names the file).
    """
    with metrics_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not any(k.startswith("time/") for k in rows[0]):
        raise ValueError(f"{metrics_csv}: no time/<phase> columns (was it written by PolicyOptimization?)")
    steps = []
    for row in rows:
        values = {
            k.removeprefix("time/"): float(v)
            for k, v in row.items()
            if k.startswith("time/") and v not in ("", None)
        }
        if values:
            steps.append(values)
    return steps


def summarize(steps: list[dict[str, float]], skip: int = 1) -> dict[str, Any]:
    """Median seconds and share of the step per phase over ``steps[skip:]`` (all steps when too few)."""
    kept = steps[skip:] or steps
    totals = [sum(s.values()) for s in kept]
    total = common.median(totals)
    phases = {}
    for name in dict.fromkeys([*PHASES, *(k for s in kept for k in s)]):
        values = [s[name] for s in kept if name in s]
        if values:
            med = common.median(values)
            phases[name] = {"median_s": med, "share": med / total if total > 0 else float("nan")}
    return {"steps": len(steps), "kept": len(kept), "median_step_s": total, "phases": phases}


def run_variant(
    name: str, configs: tuple[str, ...], s: Settings, root: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """One ``qoq fit`` of the demo with ``configs`` added; its phase summary (or ``error``)."""
    overlay = root / "overlay.yaml"
    root.mkdir(parents=True, exist_ok=True)
    overlay.write_text(f"trainer:\n  max_steps: {s.steps}\n" + s.overlay)
    args = ["fit", "--config", "configs/demo.yaml"]
    for extra in (*configs, str(overlay)):
        args += ["--config", extra]
    args += ["--trainer.max_steps", str(s.steps), "--trainer.default_root_dir", str(root / "run")]
    log = root / "fit.log"
    start = time.perf_counter()
    try:
        proc = common.run_module("qoq.cli", args, timeout=s.timeout, log=log, env=env)
        error = None if proc.returncode == 0 else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {s.timeout:.0f} s"
    wall = time.perf_counter() - start
    command = ("qoq " + " ".join(args)).replace(str(root), "<tmp>")
    if error is not None:
        return {"variant": name, "command": command, "error": f"{error}:\n{common.tail(log)}", "wall_s": wall}
    steps = read_phases(root / "run" / "metrics.csv")
    return {"variant": name, "command": command, "wall_s": wall, "per_step": steps, **summarize(steps)}


def run(smoke: bool = False, settings: Settings | None = None) -> dict[str, Any]:
    """Run every variant of ``settings`` (default :data:`FULL`, or :data:`SMOKE`) and summarise its phases."""
    s = settings or (SMOKE if smoke else FULL)
    out = []
    with tempfile.TemporaryDirectory(prefix="qoq-bench-phases-") as tmp:
        for name, configs in s.variants.items():
            res = run_variant(name, configs, s, Path(tmp) / name, env=common.SMOKE_ENV if smoke else None)
            out.append(res)
            if "error" in res:
                print(f"[phases] {name}: FAILED {res['error']}", flush=True)
            else:
                shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in res["phases"].items())
                print(f"[phases] {name}: median step {res['median_step_s']:.2f} s ({shares})", flush=True)
    settings = {
        "steps": s.steps,
        "variants": {k: list(v) for k, v in s.variants.items()},
        "overlay": s.overlay,
    }
    return {"settings": settings, "runs": out}


def render(results: dict[str, Any]) -> str:
    """The markdown section of RESULTS.md for these results."""
    overlay = results["settings"].get("overlay", "")
    head = "`<tmp>/overlay.yaml` (written by the benchmark, besides `trainer.max_steps`):"
    lines = [f"{head}\n\n```yaml\n{overlay}```\n"]
    for r in results["runs"]:
        lines.append(f"**{r['variant']}**: `{r['command']}` (run wall time {r['wall_s']:.0f} s)\n")
        if "error" in r:
            lines.append(f"failed:\n\n```\n{r['error'][-1500:]}\n```\n")
            continue
        rows = [
            {"phase": k, "median s": v["median_s"], "share of step": f"{v['share']:.1%}"}
            for k, v in r["phases"].items()
        ]
        rows.append(
            {"phase": "step (sum of phases)", "median s": r["median_step_s"], "share of step": "100%"}
        )
        lines.append(f"{r['kept']} of {r['steps']} steps (first left out):\n")
        lines.append(common.markdown_table(rows))
    return "\n".join(lines) + "\n"


def main() -> None:
    """Command-line entry point."""
    args = common.command_line(__doc__.splitlines()[0], "the smoke overlay, 2 steps, vLLM only").parse_args()
    common.finish(run(args.smoke), args.out, render)


if __name__ == "__main__":
    sys.exit(main())
