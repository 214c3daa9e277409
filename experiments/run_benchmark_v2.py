"""Benchmark v2: can qoq tell GRPO, DRPO and the balancing methods apart? Each run exactly as a user runs it.

::

    python -m experiments.run_benchmark_v2 [--methods grpo drpo ...] [--seeds 0 1 2] [--conditions easy_head]
                                           [--steps N] [--sft-steps N] [--jobs 2] [--report-only]
    python -m experiments.run_benchmark_v2 --conditions easy_head easy_head@lr1e-4 easy_head@group8 ...

A condition is a data condition (``easy_head``, ``noisy_head``) optionally followed by ``@<regime>``, an RL
overlay from ``configs/regime/`` (learning rate, group size, prompts per step, reward weights) layered after
``configs/benchmark_v2.yaml``; regimes share the data condition's warm starts, benchmark build and SFT row.

1. per seed, the generalist warm start ``qoq fit --config configs/benchmark_v2_sft.yaml --seed_everything k``
   (SFT on the domain-balanced pool; also the "sft" row), evaluated on the held-out split;
2. per condition, method and seed, ``qoq fit --config configs/benchmark_v2.yaml [--data <condition's data>]
   [--config configs/regime/<regime>.yaml] --config configs/algorithm/<method>.yaml --seed_everything k``
   from that seed's warm start:
   every method of a seed starts from the same weights and sees the same data stream and rollout seeds
   (all derived from ``k``, :mod:`qoq.seeds`);
3. every run is evaluated twice on the 200 held-out records per domain: greedy (``test/``) and at
   temperature 1 with 4 samples per record (``test_t1/``);
4. writes ``results.md`` (per-domain accuracy, macro, rare-domain mean, worst domain, paired differences to
   GRPO and to the warm start with 95 % t intervals, the precondition: the share of held-out records whose
   4 samples differ in accuracy; cross-domain label leakage), an overview table of every condition,
   ``runs.csv`` (every run, every number), learning curves per domain and
   method, and the DRPO diagnostics (per domain and step: mean |advantage|, T_d, T_c, answer shares) into
   the results folder.

Runs resume: a fit with a ``fit.json`` marker and an evaluation with its marker are not run again, so an
interrupted comparison continues where it stopped; ``--report-only`` tabulates whatever has finished. Every
run is a subprocess ``python -m qoq.cli`` with one intra-op thread.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from experiments.run_ablation import _run_cli, cli_command, find_report, moving_average

ROOT = Path(__file__).resolve().parents[1]
SFT = "sft"
#: The comparison, in priority order (an interrupted run leaves the first ones complete).
DEFAULT_METHODS = ("grpo", "drpo", "drpo_nokl", "drpo_domain_only", "grpo_adaptive", "disco")
#: condition -> ``qoq`` arguments on top of configs/benchmark_v2.yaml (empty: the first condition).
CONDITIONS: dict[str, tuple[str, ...]] = {
    "easy_head": (),
    "noisy_head": ("--data", "configs/data/benchmark_v2_noisy_head.yaml"),
}
#: A condition may name an RL regime after "@" (``easy_head@group8``): ``configs/regime/<name>.yaml`` is
#: layered on top; the warm starts, the benchmark build and the SFT row are the data condition's.
REGIMES = ROOT / "configs" / "regime"


def data_condition(condition: str) -> str:
    """``easy_head@group8`` -> ``easy_head`` (the part that decides the data and the held-out split)."""
    return condition.partition("@")[0]


def sft_suffix(condition: str) -> str:
    """Suffix of the warm start's evaluation folders for a condition's held-out split ("" for easy_head)."""
    data = data_condition(condition)
    return "" if data == "easy_head" else f"-{data}"


def condition_args(condition: str) -> tuple[str, ...]:
    """The ``qoq`` arguments of a condition: its data overlay, then its regime overlay if it names one."""
    data, _, regime = condition.partition("@")
    return (*CONDITIONS.get(data, ()), *(("--config", f"configs/regime/{regime}.yaml") if regime else ()))


def check_condition(condition: str) -> str:
    """argparse type: a known data condition, optionally with a known regime."""
    data, _, regime = condition.partition("@")
    if data not in CONDITIONS:
        raise argparse.ArgumentTypeError(f"unknown condition {data!r} (known: {', '.join(CONDITIONS)})")
    if regime and not (REGIMES / f"{regime}.yaml").is_file():
        known = ", ".join(sorted(p.stem for p in REGIMES.glob("*.yaml")))
        raise argparse.ArgumentTypeError(f"unknown regime {regime!r} (configs/regime/: {known})")
    return condition


#: Samples per held-out record in the temperature-1 evaluation.
T1_SAMPLES = 4
#: The evaluations of every run: folder name -> extra ``qoq test`` arguments (seed filled in per run).
EVALS = {
    "test": [],
    "test_t1": [
        "--model.init_args.eval_sampling",
        f"{{n: {T1_SAMPLES}, max_new_tokens: 32, temperature: 1.0, seed: {{seed}}}}",
    ],
}
#: Domains with this share of the RL stream or less count as rare.
RARE_SHARE = 0.03
#: Two-sided 97.5 % quantiles of Student's t by degrees of freedom (95 % intervals).
T_QUANTILE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """What to run, and where.

    Args:
        methods: algorithm config names (``configs/algorithm/<name>.yaml``).
        seeds: run seeds (each has its own warm start).
        conditions: names in :data:`CONDITIONS`.
        steps: RL optimizer steps per run; None keeps ``configs/benchmark_v2.yaml``'s.
        sft_steps: warm-start steps; None keeps ``configs/benchmark_v2_sft.yaml``'s.
        jobs: runs at a time.
        root: folder of the runs.
        results: folder of the report.
        eval_batches: held-out batches (of 100 records) per evaluation; None: all (``--smoke``: 1).
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = ("easy_head",)
    steps: int | None = None
    sft_steps: int | None = None
    jobs: int = 2
    root: Path = ROOT / "runs" / "benchmark_v2"
    results: Path = ROOT / "experiments" / "results" / "benchmark_v2"
    eval_batches: int | None = None

    def benchmark_dir(self, condition: str) -> Path:
        """The benchmark build of a condition (the noisy head has its own training labels)."""
        condition = data_condition(condition)
        return self.root / ("benchmark" if condition == "easy_head" else f"benchmark-{condition}")

    def run_dir(self, condition: str, method: str, seed: int) -> Path:
        """Folder of one run; the warm start (method "sft") is shared by the conditions."""
        if method == SFT:
            return self.root / SFT / f"seed{seed}"
        return self.root / condition / method / f"seed{seed}"

    def sft_checkpoint(self, seed: int) -> Path:
        return self.run_dir("", SFT, seed) / "checkpoints" / "last.ckpt"

    def _configs(self, condition: str, method: str) -> list[str]:
        algorithm = [] if method == SFT else ["--config", f"configs/algorithm/{method}.yaml"]
        return ["--config", "configs/benchmark_v2.yaml", *condition_args(condition), *algorithm]

    def fit_argv(self, condition: str, method: str, seed: int) -> list[str]:
        """``qoq fit`` arguments of one run (only ``--seed_everything`` sets its seeds)."""
        run = self.run_dir(condition, method, seed)
        common = ["--seed_everything", str(seed), "--trainer.default_root_dir", str(run),
                  "--trainer.enable_progress_bar", "false"]  # fmt: skip
        if method == SFT:
            steps = [] if self.sft_steps is None else ["--trainer.max_steps", str(self.sft_steps)]
            return ["fit", "--config", "configs/benchmark_v2_sft.yaml", *common, *steps,
                    "--data.init_args.root", str(self.benchmark_dir("easy_head"))]  # fmt: skip
        steps = [] if self.steps is None else ["--trainer.max_steps", str(self.steps)]
        return ["fit", *self._configs(condition, method), *common, *steps,
                "--model.init_args.init_policy_from", str(self.sft_checkpoint(seed)),
                "--data.init_args.root", str(self.benchmark_dir(condition))]  # fmt: skip

    def test_argv(self, condition: str, method: str, seed: int, name: str) -> list[str]:
        """``qoq test`` arguments of one evaluation (the SFT row: the RL config with the warm-start weights)."""
        run = self.run_dir(condition, method, seed)
        ckpt = [] if method == SFT else ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
        extra = [a.replace("{seed}", str(seed)) for a in EVALS[name]]
        return ["test", *self._configs(condition, method), "--seed_everything", str(seed),
                "--model.init_args.init_policy_from", str(self.sft_checkpoint(seed)), *ckpt,
                "--trainer.default_root_dir", str(run / name), "--trainer.enable_progress_bar", "false",
                "--data.init_args.root", str(self.benchmark_dir(condition)), *extra,
                *([] if self.eval_batches is None else ["--trainer.limit_test_batches", str(self.eval_batches)])]  # fmt: skip

    def command(self) -> str:
        parts = ["python -m experiments.run_benchmark_v2", "--methods", *self.methods, "--seeds",
                 *map(str, self.seeds), "--conditions", *self.conditions]  # fmt: skip
        parts += [] if self.steps is None else ["--steps", str(self.steps)]
        parts += [] if self.sft_steps is None else ["--sft-steps", str(self.sft_steps)]
        parts += [] if self.eval_batches is None else ["--eval-batches", str(self.eval_batches)]
        return " ".join(parts)


# --------------------------------------------------------------------------------------- running
@dataclass
class Run:
    """One run and where it stands.

    Attributes:
        condition: condition name ("" for a warm start).
        method: algorithm name, or "sft".
        seed: run seed.
        fit_s: wall seconds of its fit.
        eval_s: wall seconds of its evaluations.
        reports: evaluation name -> report folder (finished ones).
        error: why it failed, or "".
    """

    condition: str
    method: str
    seed: int
    fit_s: float = 0.0
    eval_s: float = 0.0
    reports: dict[str, Path] | None = None
    error: str = ""


def run_one(plan: Plan, condition: str, method: str, seed: int, say=print) -> Run:
    """Fit (unless its marker exists) and evaluate (unless each evaluation's marker exists) one run."""
    run_dir = plan.run_dir(condition, method, seed)
    result = Run(condition, method, seed, reports={})
    try:
        marker = run_dir / "fit.json"
        if marker.is_file():
            result.fit_s = json.loads(marker.read_text())["wall_s"]
        else:
            argv = plan.fit_argv(condition, method, seed)
            say(f"[{_now()}] start fit  {condition or '-'} {method} seed {seed}")
            result.fit_s = _run_cli(argv, run_dir / "fit.log")
            marker.write_text(json.dumps({"wall_s": result.fit_s, "command": cli_command(argv),
                                          "load": os.getloadavg(), "commit": _commit()}, indent=1))  # fmt: skip
            say(f"[{_now()}] done  fit  {condition or '-'} {method} seed {seed} in {result.fit_s:.0f} s")
        if method == SFT:  # the warm start is evaluated once per condition's benchmark below
            return result
        for name in EVALS:
            result.eval_s += _evaluate(plan, condition, method, seed, name, say)
            result.reports[name] = find_report(run_dir / name)
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
        result.error = str(err)
        say(f"[{_now()}] FAILED {condition or '-'} {method} seed {seed}: {err}")
    return result


def _evaluate(plan: Plan, condition: str, method: str, seed: int, name: str, say) -> float:
    run_dir = plan.run_dir(condition, method, seed)
    marker = run_dir / f"{name}.json"
    if marker.is_file() and find_report(run_dir / name) is not None:
        return json.loads(marker.read_text())["wall_s"]
    argv = plan.test_argv(condition, method, seed, name)
    wall = _run_cli(argv, run_dir / f"{name}.log")
    if find_report(run_dir / name) is None:
        raise RuntimeError(f"qoq test wrote no report under {run_dir / name}")
    marker.write_text(json.dumps({"wall_s": wall, "command": cli_command(argv)}, indent=1))
    say(f"[{_now()}] done  {name} {condition or '-'} {method} seed {seed} in {wall:.0f} s")
    return wall


def sft_rows(plan: Plan, condition: str, seed: int, say=print) -> Run:
    """The warm start as a row of ``condition``: evaluated on that condition's held-out split."""
    row = Run(condition, SFT, seed, reports={})
    run_dir = plan.run_dir(condition, SFT, seed)
    condition = data_condition(condition)  # a regime changes the RL stage only: the warm start's rows are shared
    sub = sft_suffix(condition)
    try:
        for name in EVALS:
            folder = f"{name}{sub}"
            marker = run_dir / f"{folder}.json"
            if not (marker.is_file() and find_report(run_dir / folder) is not None):
                argv = plan.test_argv(condition, SFT, seed, name)
                argv[argv.index("--trainer.default_root_dir") + 1] = str(run_dir / folder)
                wall = _run_cli(argv, run_dir / f"{folder}.log")
                marker.write_text(json.dumps({"wall_s": wall, "command": cli_command(argv)}, indent=1))
                say(f"[{_now()}] done  {name} {condition} sft seed {seed} in {wall:.0f} s")
            row.eval_s += json.loads(marker.read_text())["wall_s"]
            row.reports[name] = find_report(run_dir / folder)
        shares = eval_scores(row.reports["test_t1"])
        say(
            f"[{_now()}] precondition, {condition} warm start seed {seed}: share of held-out records whose "
            f"{T1_SAMPLES} samples at T = 1 differ in accuracy: "
            + ", ".join(f"{d} {v['varied']:.2f}" for d, v in shares.items())
        )
        fit = run_dir / "fit.json"
        row.fit_s = json.loads(fit.read_text())["wall_s"] if fit.is_file() else 0.0
    except Exception as err:  # noqa: BLE001
        row.error = str(err)
        say(f"[{_now()}] FAILED {condition} sft seed {seed}: {err}")
    return row


def run_all(plan: Plan, say=print) -> list[Run]:
    """Warm starts first, then per condition and seed: the SFT row and every method, ``plan.jobs`` at a time.

    Runs are ordered condition by condition, then method by method (priority order) over the seeds, so an
    interrupted comparison leaves the first methods complete on every seed.
    """
    lock = threading.Lock()

    def locked(msg: str) -> None:
        with lock:
            say(msg)

    with ThreadPoolExecutor(max_workers=max(1, plan.jobs)) as pool:
        warm: dict[int, Future] = {s: pool.submit(run_one, plan, "", SFT, s, locked) for s in plan.seeds}

        def after(fn, condition: str, method: str, seed: int) -> Run:
            base = warm[seed].result()
            if base.error:
                return Run(
                    condition, method, seed, error=f"its warm start failed: {base.error.splitlines()[0]}"
                )
            return (
                fn(plan, condition, method, seed, locked)
                if fn is run_one
                else fn(plan, condition, seed, locked)
            )

        jobs = []
        for c in plan.conditions:
            jobs += [pool.submit(after, sft_rows, c, SFT, s) for s in plan.seeds]
            jobs += [pool.submit(after, run_one, c, m, s) for m in plan.methods for s in plan.seeds]
        return [f.result() for f in jobs]


def build(plan: Plan, condition: str) -> Path:
    """Build (or reuse) a condition's benchmark with the settings of its data config."""
    import yaml

    from qoq.data.benchmark import build_benchmark

    args = CONDITIONS.get(data_condition(condition), ())
    data = args[args.index("--data") + 1] if "--data" in args else "configs/data/benchmark_v2.yaml"
    cfg = yaml.safe_load((ROOT / data).read_text())["init_args"]
    keys = ("counts", "eval_per_domain", "image_size", "sft_per_domain", "held_out_sources", "label_noise")
    return build_benchmark(plan.benchmark_dir(condition), seed=cfg["build_seed"], quiet=True,
                           **{k: cfg[k] for k in keys})  # fmt: skip


def _now() -> str:
    return time.strftime("%H:%M:%S")


def finished(plan: Plan) -> list[Run]:
    """Every run whose evaluations have finished, without running anything."""
    out = []
    for c in plan.conditions:
        sub = sft_suffix(c)
        for m in (SFT, *plan.methods):
            for s in plan.seeds:
                run_dir = plan.run_dir(c, m, s)
                reports = {n: find_report(run_dir / (f"{n}{sub}" if m == SFT else n)) for n in EVALS}
                if all(reports.values()):
                    walls = [json.loads(p.read_text())["wall_s"] for p in
                             [run_dir / "fit.json", *[run_dir / f"{n}{sub if m == SFT else ''}.json" for n in EVALS]]
                             if p.is_file()]  # fmt: skip
                    fit = (
                        json.loads((run_dir / "fit.json").read_text())["wall_s"]
                        if (run_dir / "fit.json").is_file()
                        else 0.0
                    )
                    out.append(Run(c, m, s, fit, sum(walls) - fit, reports))
    return out


# ------------------------------------------------------------------------------------- collecting
def eval_scores(report: Path) -> dict[str, dict[str, float]]:
    """Per-domain scores of one evaluation, from its ``traces.jsonl`` (one row per sampled response).

    Returns:
        domain -> {"accuracy": share of responses whose answer is exactly right, "in_labels": share whose
        answer is one of the domain's labels, "varied": share of records whose samples differ in accuracy
        (1 sample per record: 0), "foreign": share whose answer is a label of another benchmark domain and
        not of its own (cross-domain label leakage), "records": records}.
    """
    from qoq.data.benchmark import TASKS
    from qoq.rl.rewards import extract_answer

    own = {t.domain: set(t.labels) for t in TASKS}
    every = tuple(dict.fromkeys(x for t in TASKS for x in t.labels))
    by_record: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    answered: dict[str, list[bool]] = defaultdict(list)
    foreign: dict[str, list[bool]] = defaultdict(list)
    with (report / "traces.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            domain = row["domain"]
            by_record[domain][row["prompt_id"]].append(float(row["rewards"]["accuracy"]))
            answered[domain].append(bool(row["predicted"]))
            said = extract_answer(row.get("response", ""), every)
            foreign[domain].append(bool(said) and not said & own.get(domain, set()))
    out = {}
    for domain, records in by_record.items():
        values = [a for accs in records.values() for a in accs]
        out[domain] = {
            "accuracy": statistics.fmean(values),
            "in_labels": statistics.fmean(answered[domain]),
            "varied": statistics.fmean(len(set(accs)) > 1 for accs in records.values()),
            "foreign": statistics.fmean(foreign[domain]),
            "records": float(len(records)),
        }
    return out


@dataclass(frozen=True)
class Domains:
    """The benchmark's domains (most training records first), which are rare, which are synthetic."""

    names: tuple[str, ...]
    train: Mapping[str, int]
    rare: tuple[str, ...]
    synthetic: tuple[str, ...]

    @classmethod
    def of(cls, benchmark_dir: Path) -> Domains:
        from qoq.data.benchmark import TASKS

        train = json.loads((benchmark_dir / "build.json").read_text())["records"]["train"]
        total = sum(train.values())
        names = tuple(sorted(train, key=lambda d: -train[d]))
        synthetic = tuple(t.domain for t in TASKS if t.origin == "synthetic" and t.domain in train)
        return cls(names, train, tuple(d for d in names if train[d] / total <= RARE_SHARE), synthetic)

    @property
    def real(self) -> tuple[str, ...]:
        return tuple(d for d in self.names if d not in self.synthetic)


def summary(
    scores: Mapping[str, Mapping[str, float]], domains: Domains, key: str = "accuracy"
) -> dict[str, float]:
    """Per-domain values plus ``macro`` (real-derived domains), ``rare`` (mean) and ``worst`` (real-derived)."""
    out = {d: scores.get(d, {}).get(key, math.nan) for d in domains.names}
    real = [out[d] for d in domains.real]
    out["macro"] = statistics.fmean(real) if real else math.nan
    out["rare"] = statistics.fmean(out[d] for d in domains.rare) if domains.rare else math.nan
    out["worst"] = min(real) if real else math.nan
    return out


def interval(diffs: Sequence[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences (NaN interval for fewer than 2)."""
    xs = [d for d in diffs if math.isfinite(d)]
    if not xs:
        return math.nan, math.nan, math.nan
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return mean, math.nan, math.nan
    half = T_QUANTILE.get(len(xs) - 1, 1.96) * statistics.stdev(xs) / math.sqrt(len(xs))
    return mean, mean - half, mean + half


def fmt_interval(diffs: Sequence[float]) -> str:
    mean, lo, hi = interval(diffs)
    if not math.isfinite(mean):
        return "n/a"
    n = sum(math.isfinite(d) for d in diffs)
    if not math.isfinite(lo):
        return f"{mean:+.3f} (n={n})"
    mark = " *" if (lo > 0 or hi < 0) and n >= 3 else ""
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]{mark} (n={n})"


def fmt_mean(values: Sequence[float]) -> str:
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return "n/a"
    return f"{statistics.fmean(xs):.3f}" + (f" ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")


def read_trace(run_dir: Path) -> dict[int, list[dict]]:
    """``rollouts.jsonl`` by rollout step (0, 1, ... in order)."""
    path = run_dir / "rollouts.jsonl"
    by_step: dict[int, list[dict]] = defaultdict(list)
    if path.is_file():
        with path.open() as f:
            for line in f:
                row = json.loads(line)
                by_step[int(row.get("step", 0))].append(row)
    return {i: by_step[s] for i, s in enumerate(sorted(by_step))}


def trace_curves(run_dir: Path, labels: Mapping[str, Sequence[str]]) -> dict[str, dict[int, float]]:
    """Per domain and rollout step: accuracy, mean |advantage|, responses and the share of each answer label.

    Keys ``acc/<d>``, ``adv/<d>``, ``n/<d>``, ``groupsum/<d>`` (mean over the domain's groups of the sum of
    their advantages: 0 for GRPO, below 0 where DRPO's damping shrinks only positive advantages) and
    ``label/<d>/<label>`` (``label/<d>/(other)`` for answers outside every label set); a domain has values only
    at the steps where it was in the batch.
    """
    from qoq.rl.rewards import extract_answer

    curves: dict[str, dict[int, float]] = defaultdict(dict)
    for step, rows in read_trace(run_dir).items():
        by_domain: dict[str, list[dict]] = defaultdict(list)
        for r in rows:
            by_domain[r["domain"]].append(r)
        for d, mine in by_domain.items():
            curves[f"acc/{d}"][step] = statistics.fmean(r["components"].get("accuracy", 0.0) for r in mine)
            curves[f"adv/{d}"][step] = statistics.fmean(abs(r["advantage"]) for r in mine)
            curves[f"n/{d}"][step] = float(len(mine))
            sums: dict[str, float] = defaultdict(float)
            for r in mine:
                sums[r["prompt_id"]] += r["advantage"]
            curves[f"groupsum/{d}"][step] = statistics.fmean(sums.values())
            if d in labels:
                every = labels.get("*", ())
                answers = Counter()
                for r in mine:
                    got = extract_answer(r["response"], every) if every else frozenset()
                    answers[next(iter(got)) if len(got) == 1 else "(other)"] += 1
                for label, count in answers.items():
                    curves[f"label/{d}/{label}"][step] = count / len(mine)
    return dict(curves)


def drpo_scales(run_dir: Path) -> dict[str, dict[int, float]]:
    """DRPO's logged T_d and mean T_c per domain, and the damping threshold t, per logged step (``metrics.csv``)."""
    path = run_dir / "metrics.csv"
    out: dict[str, dict[int, float]] = defaultdict(dict)
    if not path.is_file():
        return {}
    with path.open(newline="") as f:
        for i, row in enumerate(r for r in csv.DictReader(f) if r.get("train/reward")):
            for key, value in row.items():
                if key.startswith(
                    ("train/advantage/T_d/", "train/advantage/T_c_mean/", "train/advantage/damping_t")
                ) and value not in ("", None):
                    v = float(value)
                    if math.isfinite(v):
                        out[key.removeprefix("train/advantage/")][i] = v
    return dict(out)


# --------------------------------------------------------------------------------------- writing
def write_report(
    plan: Plan, runs: Sequence[Run], *, command: str, wall_s: float, load: tuple, commit: str
) -> Path:
    """``results.md``, ``runs.csv``, ``curves_<condition>.png`` and ``diagnostics_<condition>.png``."""
    out = plan.results
    out.mkdir(parents=True, exist_ok=True)
    done = [r for r in runs if r.reports and all(r.reports.get(n) for n in EVALS) and not r.error]
    scores = {(r.condition, r.method, r.seed): {n: eval_scores(r.reports[n]) for n in EVALS} for r in done}
    made = Counter(_fit_commit(plan, r) for r in done)
    lines = ["# Benchmark v2: GRPO, DRPO and balancing methods from a generalist warm start", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by commit `{commit}`; the tabulated "
             "runs were made by " + ", ".join(f"`{c}` ({n} runs)" for c, n in made.items()) + ".", "",
             "```", plan.command(), "```", "", (f"This invocation: `{command}`; wall {wall_s / 60:.1f} min; "
             f"load average (1/5/15 min) {_load(load[0])} at its start, {_load(load[1])} at its end "
             f"({os.cpu_count()} cores). The tabulated runs span {_span(plan, runs) / 60:.1f} min from the first "
             "fit's start to the last evaluation's end (from their marker files); per-run times and the load at the "
             "end of each fit are in the Runs table."), ""]  # fmt: skip
    rows_csv, sections, overview = [], [], []
    for condition in plan.conditions:
        if not plan.benchmark_dir(condition).joinpath("build.json").is_file():
            continue
        domains = Domains.of(plan.benchmark_dir(condition))
        sections += _condition_section(plan, condition, domains, scores, done, rows_csv, out, overview)
    lines += _overview_table(overview) + sections
    lines += ["## Runs", "", "| condition | method | seed | fit (s) | evaluations (s) | load at fit end | status |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in runs:
        status = "ok" if r in done else ("FAILED: " + r.error.splitlines()[0] if r.error else "not finished")
        lines.append(f"| {r.condition or '(warm start)'} | {r.method} | {r.seed} | {r.fit_s:.0f} | {r.eval_s:.0f} | "
                     f"{_fit_load(plan, r)} | {status} |")  # fmt: skip
    lines += ["", "Commands of one seed (the others differ only in the seed and folders):", "", "```"]
    seed, condition = plan.seeds[0], plan.conditions[0]
    lines.append(_relative(cli_command(plan.fit_argv("", SFT, seed))))
    for m in plan.methods[:1]:
        lines.append(_relative(cli_command(plan.fit_argv(condition, m, seed))))
        lines += [_relative(cli_command(plan.test_argv(condition, m, seed, n))) for n in EVALS]
    lines += ["```", ""]
    _write_csv(out / "runs.csv", rows_csv)
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def _overview_table(rows: Sequence[str]) -> list[str]:
    return ["## Overview", "",
            ("Greedy held-out accuracy (primary): macro over the real-derived domains, mean ± std over seeds, and "
             "the paired differences (per seed, same warm start) to the warm start and to GRPO of the same "
             "condition, mean [95 % t interval]; * = the interval excludes 0. Details per condition below."), "",
            "| condition | method | macro | rare | worst | minus SFT, macro | minus GRPO, macro | minus GRPO, rare |",
            "|---|---|---|---|---|---|---|---|", *rows, ""]  # fmt: skip


def _condition_section(plan, condition, domains, scores, done, rows_csv, out, overview) -> list[str]:
    methods = [SFT, *plan.methods]
    per: dict[tuple[str, str, int], dict[str, float]] = {}
    for (c, m, s), sc in scores.items():
        if c != condition:
            continue
        values = {}
        for name, key in (
            ("test", "accuracy"),
            ("test_t1", "accuracy"),
            ("test_t1", "varied"),
            ("test_t1", "in_labels"),
            ("test", "foreign"),
        ):
            for k, v in summary(sc[name], domains, key).items():
                values[f"{'greedy' if name == 'test' else 't1'}_{key}/{k}"] = v
        per[m, s] = values
        rows_csv.append({"condition": c, "method": m, "seed": s, **values})
    for m in methods:
        seeds = [s for s in plan.seeds if (m, s) in per]
        if not seeds:
            continue

        def diff(base: str, col: str, m=m) -> str:
            return fmt_interval([per[m, s][f"greedy_accuracy/{col}"] - per[base, s][f"greedy_accuracy/{col}"]
                                 for s in plan.seeds if (m, s) in per and (base, s) in per]) if m != base else ""  # fmt: skip

        cells = [fmt_mean([per[m, s][f"greedy_accuracy/{c}"] for s in seeds]) for c in ("macro", "rare", "worst")]
        overview.append(f"| {condition} | {m} | " + " | ".join(cells) + f" | {diff(SFT, 'macro')} | "
                        f"{diff('grpo', 'macro')} | {diff('grpo', 'rare')} |")  # fmt: skip
    cols = [*domains.names, "macro", "rare", "worst"]
    share = {d: domains.train[d] / sum(domains.train.values()) for d in domains.names}
    head = [f"{d} ({share[d]:.1%}{', synthetic' if d in domains.synthetic else ''})" for d in domains.names]
    head += ["macro (real)", f"rare ({', '.join(domains.rare)})", "worst (real)"]
    lines = [f"## Condition `{condition}`", ""]

    def table(prefix: str, title: str) -> list[str]:
        rows = [f"### {title}", "", "| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
        for m in methods:
            cells = [
                fmt_mean([per[m, s][f"{prefix}/{c}"] for s in plan.seeds if (m, s) in per]) for c in cols
            ]
            if any(c != "n/a" for c in cells):
                rows.append(f"| {m} | " + " | ".join(cells) + " |")
        return rows + [""]

    def paired(prefix: str, base: str, title: str) -> list[str]:
        rows = [f"### {title}", "", "Per seed (same warm start, same data stream), method minus " + base +
                "; mean [95 % t interval] over seeds; * = the interval excludes 0 (3 or more seeds).", "",
                "| method | macro (real) | rare | worst | " + " | ".join(domains.names) + " |",
                "|---|" + "---|" * (3 + len(domains.names))]  # fmt: skip
        for m in methods:
            if m == base:
                continue
            cells = []
            for c in ["macro", "rare", "worst", *domains.names]:
                diffs = [per[m, s][f"{prefix}/{c}"] - per[base, s][f"{prefix}/{c}"] for s in plan.seeds
                         if (m, s) in per and (base, s) in per]  # fmt: skip
                cells.append(fmt_interval(diffs))
            if any(c != "n/a" for c in cells):
                rows.append(f"| {m} | " + " | ".join(cells) + " |")
        return rows + [""]

    lines += [
        (
            "Accuracy = share of held-out answers that are exactly right (200 records per domain; "
            f"greedy: one answer per record; T = 1: {T1_SAMPLES} samples per record). Mean ± std over seeds."
        ),
        "",
    ]
    lines += table("greedy_accuracy", "Held-out accuracy, greedy (primary)")
    lines += paired("greedy_accuracy", "grpo", "Paired difference to GRPO, greedy accuracy")
    lines += paired("greedy_accuracy", SFT, "Paired difference to the warm start (SFT), greedy accuracy")
    lines += table("t1_accuracy", f"Held-out accuracy at temperature 1 ({T1_SAMPLES} samples per record)")
    lines += paired("t1_accuracy", "grpo", "Paired difference to GRPO, accuracy at T = 1")
    lines += paired("t1_accuracy", SFT, "Paired difference to the warm start (SFT), accuracy at T = 1")
    lines += table(
        "t1_varied",
        "Precondition: share of held-out records whose T = 1 samples differ in accuracy "
        "(the groups GRPO/DRPO learn from; the sft row is the warm start)",
    )
    lines += table("t1_in_labels", "Share of T = 1 answers that are one of the domain's labels")
    lines += table("greedy_foreign", "Cross-domain label leakage: share of greedy answers that are another "
                   "domain's label (e.g. ct's \"non-contrast\" for a pathology tile)")
    curves = {(m, s): trace_curves(plan.run_dir(condition, m, s), _labels(domains)) for m in plan.methods
              for s in plan.seeds if (m, s) in per}  # fmt: skip
    if curves:
        name = f"curves_{condition}.png"
        _plot_per_domain(out / name, plan, domains, curves, "acc", "training accuracy (trailing mean)")
        lines += ["### Learning curves", "", f"![training accuracy per domain and method]({name})", ""]
        lines += _advantage_table(plan, domains, curves)
        diag = f"diagnostics_{condition}.png"
        scales = {
            (m, s): drpo_scales(plan.run_dir(condition, m, s)) for (m, s) in curves if m.startswith("drpo")
        }
        _plot_diagnostics(out / diag, plan, domains, curves, scales)
        lines += _damping_table(scales)
        lines += ["### Diagnostics (rare domains)", "",
                  ("Per rare domain and rollout step, mean over seeds: mean |advantage| of its responses, DRPO's "
                   "T_d and mean T_c (from `metrics.csv`), and the share of its sampled answers per label "
                   "(GRPO vs DRPO)."), "", f"![diagnostics]({diag})", ""]  # fmt: skip
    return lines


def _labels(domains: Domains) -> dict[str, Sequence[str]]:
    from qoq.data.benchmark import TASKS

    every = tuple(dict.fromkeys(x for t in TASKS for x in t.labels))
    return {**{d: () for d in domains.names}, "*": every}


def _advantage_table(plan, domains, curves) -> list[str]:
    rows = ["### Advantage mass per domain", "",
            ("Mean |advantage| of a response (over the steps where the domain was in the batch) and the domain's "
             "share of the summed |advantage| (last row: its share of the responses), mean over seeds."), "",
            "| method | " + " | ".join(domains.names) + " |", "|---|" + "---|" * len(domains.names)]  # fmt: skip
    shares_n: dict[str, list[float]] = defaultdict(list)
    for m in plan.methods:
        runs = [c for (mm, _), c in curves.items() if mm == m]
        if not runs:
            continue
        mags, shares = defaultdict(list), defaultdict(list)
        for c in runs:
            mass = {
                d: sum(c.get(f"adv/{d}", {}).get(t, 0.0) * n for t, n in c.get(f"n/{d}", {}).items())
                for d in domains.names
            }
            total = sum(mass.values()) or 1.0
            count = {d: sum(c.get(f"n/{d}", {}).values()) for d in domains.names}
            for d in domains.names:
                if c.get(f"adv/{d}"):
                    mags[d].append(statistics.fmean(c[f"adv/{d}"].values()))
                shares[d].append(mass[d] / total)
                if m == plan.methods[0]:
                    shares_n[d].append(count[d] / (sum(count.values()) or 1.0))
        rows.append(
            f"| {m} | "
            + " | ".join(
                f"{statistics.fmean(mags[d]) if mags[d] else math.nan:.2f} ({statistics.fmean(shares[d]):.0%})"
                for d in domains.names
            )
            + " |"
        )
    rows.append(
        "| (share of responses) | "
        + " | ".join(
            f"{statistics.fmean(shares_n[d]) if shares_n[d] else math.nan:.1%}" for d in domains.names
        )
        + " |"
    )
    rows += ["", ("Mean over a domain's groups of the *sum* of the group's advantages (GRPO: 0; a negative value is a "
                  "net push away from every sampled answer of the group):"), "",
             "| method | " + " | ".join(domains.names) + " |", "|---|" + "---|" * len(domains.names)]  # fmt: skip
    for m in plan.methods:
        runs = [c for (mm, _), c in curves.items() if mm == m]
        if runs:
            cells = []
            for d in domains.names:
                xs = [v for c in runs for v in c.get(f"groupsum/{d}", {}).values()]
                cells.append(f"{statistics.fmean(xs):+.2f}" if xs else "n/a")
            rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows + [""]


def _damping_table(scales) -> list[str]:
    rows = []
    for m in sorted({m for m, _ in scales}):
        ts = [v for (mm, _), sc in scales.items() if mm == m for v in sc.get("damping_t", {}).values()]
        if ts:
            rows.append(
                f"| {m} | {len(ts)} | {statistics.fmean(t == 0.0 for t in ts):.0%} | {statistics.median(ts):.3g} |"
            )
    if not rows:
        return []
    return [("DRPO's KL damping threshold t (the 75 % quantile of max(s~ * KL, 0) over the batch) per optimizer-log "
             "row, over seeds; where t = 0 every positive advantage of the batch is zeroed:"), "",
            "| method | logged steps | share with t = 0 | median t |", "|---|---|---|---|", *rows, ""]  # fmt: skip


def _mean_curve(runs: Sequence[Mapping[int, float]], steps: Sequence[int], window: int) -> list[float]:
    smoothed = [moving_average(r, steps, window) for r in runs]
    out = []
    for j in range(len(steps)):
        xs = [s[j] for s in smoothed if math.isfinite(s[j])]
        out.append(statistics.fmean(xs) if xs else math.nan)
    return out


def _plot_per_domain(path: Path, plan: Plan, domains: Domains, curves, key: str, ylabel: str) -> None:
    from matplotlib.figure import Figure

    steps = sorted({t for c in curves.values() for t in c.get(f"{key}/{domains.names[0]}", {})} |
                   {t for c in curves.values() for d in domains.names for t in c.get(f"{key}/{d}", {})})  # fmt: skip
    if not steps:
        return
    cols = 4
    rows = math.ceil(len(domains.names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    for i, d in enumerate(domains.names):
        ax = fig.add_subplot(rows, cols, i + 1)
        window = max(5, len(steps) // (6 if d not in domains.rare else 3))
        for j, m in enumerate(plan.methods):
            runs = [c.get(f"{key}/{d}", {}) for (mm, _), c in curves.items() if mm == m]
            if runs:
                ax.plot(steps, _mean_curve(runs, steps, window), color=f"C{j}", label=m, lw=1.2)
        ax.set_title(f"{d} ({domains.train[d]} records); window {window}", fontsize=9)
        ax.set_xlabel("rollout step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_diagnostics(path: Path, plan: Plan, domains: Domains, curves, scales) -> None:
    from matplotlib.figure import Figure

    rare = list(domains.rare) or list(domains.names[-1:])
    steps = sorted({t for c in curves.values() for d in domains.names for t in c.get(f"acc/{d}", {})})
    if not steps:
        return
    methods = [m for m in plan.methods if m in ("grpo", "drpo")] or list(plan.methods[:2])
    fig = Figure(figsize=(4.4 * len(rare), 3.0 * (2 + len(methods))))
    n_rows = 2 + len(methods)
    for i, d in enumerate(rare):
        window = max(5, len(steps) // 3)
        ax = fig.add_subplot(n_rows, len(rare), i + 1)
        for j, m in enumerate(plan.methods):
            runs = [c.get(f"adv/{d}", {}) for (mm, _), c in curves.items() if mm == m]
            if runs:
                ax.plot(steps, _mean_curve(runs, steps, window), color=f"C{j}", label=m, lw=1.2)
        ax.set_title(f"{d}: mean |advantage|", fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=6)
        ax = fig.add_subplot(n_rows, len(rare), len(rare) + i + 1)
        for key, style in (("T_d", "-"), ("T_c_mean", "--")):
            runs = [sc.get(f"{key}/{d}", {}) for (mm, _), sc in scales.items() if mm == "drpo"]
            if runs and any(runs):
                xs = sorted({t for r in runs for t in r})
                ax.plot(xs, _mean_curve(runs, xs, 1), style, color="C1", label=f"drpo {key}")
        ax.set_title(f"{d}: DRPO temperatures (per logged step)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
        for k, m in enumerate(methods):
            ax = fig.add_subplot(n_rows, len(rare), (2 + k) * len(rare) + i + 1)
            labels = sorted(
                {key.split("/", 2)[2] for c in curves.values() for key in c if key.startswith(f"label/{d}/")}
            )
            for label in labels:
                runs = [c.get(f"label/{d}/{label}", {}) for (mm, _), c in curves.items() if mm == m]
                present = [{t: r.get(t, 0.0) for t in c.get(f"n/{d}", {})} for r, c in
                           zip(runs, [c for (mm, _), c in curves.items() if mm == m])]  # fmt: skip
                if present:
                    ax.plot(steps, _mean_curve(present, steps, window), label=label, lw=1.0)
            ax.set_title(f"{d}: share of sampled answers per label, {m}", fontsize=9)
            ax.set_ylim(-0.02, 1.02)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=5)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _write_csv(path: Path, rows: Sequence[Mapping]) -> None:
    names = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def _span(plan: Plan, runs: Sequence[Run]) -> float:
    """Seconds from the earliest fit start to the latest evaluation end among ``runs`` (marker files)."""
    starts, ends = [], []
    for r in runs:
        run_dir = plan.run_dir(r.condition, r.method, r.seed)
        fit = run_dir / "fit.json"
        if fit.is_file():
            starts.append(fit.stat().st_mtime - json.loads(fit.read_text())["wall_s"])
        ends += [m.stat().st_mtime for m in run_dir.glob("test*.json")]
    return max(ends) - min(starts) if starts and ends else 0.0


def _fit_commit(plan: Plan, r: Run) -> str:
    fit = plan.run_dir(r.condition, r.method, r.seed) / "fit.json"
    return (json.loads(fit.read_text()).get("commit") if fit.is_file() else None) or "commit not recorded"


def _fit_load(plan: Plan, r: Run) -> str:
    fit = plan.run_dir(r.condition, r.method, r.seed) / "fit.json"
    load = json.loads(fit.read_text()).get("load") if fit.is_file() else None
    return _load(load) if load else ""


def _relative(command: str) -> str:
    return command.replace(f"{ROOT}{os.sep}", "")


def _load(values: Sequence[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()  # fmt: skip
        return sha + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run_benchmark_v2", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--conditions", nargs="+", default=["easy_head"], type=check_condition,
                   help=f"data conditions ({', '.join(CONDITIONS)}), each optionally with an RL regime from "
                   "configs/regime/ after '@' (easy_head@group8)")
    p.add_argument(
        "--steps", type=int, default=None, help="RL optimizer steps (default: configs/benchmark_v2.yaml)"
    )
    p.add_argument(
        "--sft-steps",
        type=int,
        default=None,
        help="warm-start steps (default: configs/benchmark_v2_sft.yaml)",
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--root", type=Path, default=None, help="runs folder (default runs/benchmark_v2)")
    p.add_argument(
        "--results", type=Path, default=None, help="report folder (default experiments/results/benchmark_v2)"
    )
    p.add_argument(
        "--eval-batches", type=int, default=None, help="held-out batches of 100 per evaluation (default all)"
    )
    p.add_argument(
        "--smoke", action="store_true", help="3 warm-start and 2 RL steps, 1 held-out batch (checks)"
    )
    p.add_argument("--report-only", action="store_true", help="only tabulate the runs that have finished")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or with ``--report-only`` tabulate) the comparison; returns 1 if any run failed."""
    args = parse_args(argv)
    if args.smoke:
        args.steps, args.sft_steps, args.eval_batches = (
            args.steps or 2,
            args.sft_steps or 3,
            args.eval_batches or 1,
        )
    plan = Plan(methods=tuple(args.methods), seeds=tuple(args.seeds), conditions=tuple(args.conditions),
                steps=args.steps, sft_steps=args.sft_steps, jobs=args.jobs, eval_batches=args.eval_batches,
                root=(args.root or ROOT / "runs" / "benchmark_v2").resolve(),
                results=(args.results or ROOT / "experiments" / "results" / "benchmark_v2").resolve())  # fmt: skip
    for m in plan.methods:
        if not (ROOT / "configs" / "algorithm" / f"{m}.yaml").is_file():
            raise SystemExit(f"unknown method {m!r}: no configs/algorithm/{m}.yaml")
    command = "python -m experiments.run_benchmark_v2 " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    start, load_start, commit = time.perf_counter(), os.getloadavg(), _commit()
    if not args.report_only:
        for condition in plan.conditions:  # once, here: parallel runs would otherwise build it side by side
            build(plan, condition)
    runs = finished(plan) if args.report_only else run_all(plan)
    path = write_report(plan, runs, command=command, wall_s=time.perf_counter() - start,
                        load=(load_start, os.getloadavg()), commit=commit)  # fmt: skip
    print(f"[{_now()}] wrote {path}")
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
