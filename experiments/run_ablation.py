"""DRPO vs GRPO (and DRPO's ablations) on the qoq benchmark, each run exactly as a user would run it.

::

    python -m experiments.run_ablation [--methods grpo drpo drpo_domain_only drpo_nokl] [--balancing]
                                       [--seeds 0 1 2] [--steps N] [--jobs 2] [--smoke] [--report-only]

1. builds the benchmark (:func:`qoq.data.benchmark.build_benchmark`, cached);
2. per seed, the SFT warm start ``qoq fit --config configs/benchmark_sft.yaml`` (its checkpoint is also
   the "sft" baseline row), evaluated with ``qoq test --config configs/benchmark.yaml``;
3. per method and seed, ``qoq fit --config configs/benchmark.yaml --config configs/algorithm/<method>.yaml
   --seed_everything <seed>`` from that seed's SFT checkpoint, then ``qoq test --ckpt_path``;
4. writes ``ablation.md`` (mean +- std over seeds: overall, per domain, worst domain, rare domains,
   paired differences to GRPO, advantage magnitudes), ``ablation.csv`` (every run, every metric) and
   ``learning_curves.png`` into the results folder.

Every run is a subprocess of ``python -m qoq.cli`` with one intra-op thread (``OMP_NUM_THREADS=1``: on a
busy 2-core machine two threads per process spin against each other); ``--jobs`` runs that many at once.
Runs resume: a fit with a ``fit.json`` marker and a test with a report folder are not run again, so an
interrupted ablation continues where it stopped, and ``--report-only`` tabulates whatever has finished.
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
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ("grpo", "drpo", "drpo_domain_only", "drpo_nokl")
#: Balancing beyond DRPO (issue 8), added by ``--balancing``: GDPO-style per-component normalisation,
#: DISCO- and FairGRPO-style reweighting, adaptive domain sampling (with DRPO and with GRPO) and DAPO-style
#: dynamic sampling (zero-variance groups dropped and refilled).
BALANCING_METHODS = ("gdpo", "disco", "fairgrpo", "drpo_adaptive", "grpo_adaptive", "grpo_dynamic")
#: The baseline row: the SFT warm start, evaluated as is.
SFT = "sft"
#: Training records of each domain in ``--smoke`` runs (all seven domains, tiny).
SMOKE_COUNTS = {
    "ct": 8,
    "pathology": 4,
    "mammography": 3,
    "chest_xray": 2,
    "mri": 2,
    "fundus": 1,
    "ultrasound": 1,
}
SMOKE_EVAL_PER_DOMAIN = 2
#: Scores tabulated per domain (IoU only where the benchmark has region annotations).
SCORES = ("macro_f1", "balanced_accuracy", "ovr_accuracy", "iou")
TITLES = {
    "macro_f1": "macro-F1",
    "balanced_accuracy": "balanced accuracy",
    "ovr_accuracy": "one-vs-rest accuracy (the paper's 'accuracy'; inflated by true negatives)",
    "iou": "IoU",
}


# ------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """What to run, and where.

    Args:
        methods: algorithm config names (``configs/algorithm/<name>.yaml``).
        seeds: training seeds (each has its own SFT warm start).
        steps: RL steps per run; None keeps ``configs/benchmark.yaml``'s.
        sft_steps: SFT steps per seed; None keeps ``configs/benchmark_sft.yaml``'s.
        jobs: runs at a time.
        root: folder of the runs (``<root>/<method>/seed<k>``).
        results: folder of ``ablation.md``, ``ablation.csv``, ``learning_curves.png``.
        benchmark_dir: the benchmark folder.
        counts: benchmark training records per domain; None uses the defaults.
        eval_per_domain: held-out records per domain.
        smoke: tiny benchmark, batches and groups (tests and quick checks).
        rare_share: domains with less than this share of the training records count as rare.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None
    sft_steps: int | None = None
    jobs: int = 2
    root: Path = ROOT / "runs" / "ablation"
    results: Path = ROOT / "experiments" / "results"
    benchmark_dir: Path = ROOT / "runs" / "ablation" / "benchmark"
    counts: Mapping[str, int] | None = None
    eval_per_domain: int = 24
    smoke: bool = False
    rare_share: float = 0.02

    def command(self) -> str:
        """The ``run_ablation`` command line that runs this plan."""
        parts = [
            "python -m experiments.run_ablation",
            "--methods",
            *self.methods,
            "--seeds",
            *map(str, self.seeds),
        ]
        parts += [] if self.steps is None else ["--steps", str(self.steps)]
        parts += [] if self.sft_steps is None else ["--sft-steps", str(self.sft_steps)]
        return " ".join(parts + (["--smoke"] if self.smoke else []))

    def run_dir(self, method: str, seed: int) -> Path:
        """Folder of one run (the SFT warm start is method "sft")."""
        return self.root / method / f"seed{seed}"

    def sft_checkpoint(self, seed: int) -> Path:
        """The SFT warm start of ``seed``."""
        return self.run_dir(SFT, seed) / "checkpoints" / "last.ckpt"

    def _common(self) -> list[str]:
        args = ["--data.init_args.root", str(self.benchmark_dir), "--trainer.enable_progress_bar", "false"]
        if self.counts is not None:
            args += ["--data.init_args.counts", json.dumps(dict(self.counts))]
        if self.eval_per_domain != 24:
            args += ["--data.init_args.eval_per_domain", str(self.eval_per_domain)]
        if self.smoke:
            args += ["--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "16"]
        return args

    def fit_argv(self, method: str, seed: int) -> list[str]:
        """``qoq fit`` arguments of one run."""
        run = self.run_dir(method, seed)
        seeds = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
        if method == SFT:
            steps = [] if self.sft_steps is None else ["--trainer.max_steps", str(self.sft_steps)]
            return ["fit", "--config", "configs/benchmark_sft.yaml", *seeds,
                    "--trainer.default_root_dir", str(run), *steps, *self._common()]  # fmt: skip
        steps = [] if self.steps is None else ["--trainer.max_steps", str(self.steps)]
        smoke = ["--model.init_args.sampling.n", "2"] if self.smoke else []
        return ["fit", *self._configs(method), *seeds, "--model.init_args.sampling.seed", str(seed),
                "--model.init_args.init_policy_from", str(self.sft_checkpoint(seed)),
                "--trainer.default_root_dir", str(run), *steps, *smoke, *self._common()]  # fmt: skip

    def test_argv(self, method: str, seed: int) -> list[str]:
        """``qoq test`` arguments of one run (the SFT row: the RL config at step 0 with the SFT weights).

        The seeds match the fit's: a checkpoint restores the data module's stream state, which must have been
        made with the same stream seed.
        """
        run = self.run_dir(method, seed)
        ckpt = [] if method == SFT else ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")]
        seeds = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
        return ["test", *self._configs(method), *seeds, "--model.init_args.init_policy_from",
                str(self.sft_checkpoint(seed)), *ckpt, "--trainer.default_root_dir", str(run / "test"),
                *self._common()]  # fmt: skip

    @staticmethod
    def _configs(method: str) -> list[str]:
        algorithm = [] if method == SFT else ["--config", f"configs/algorithm/{method}.yaml"]
        return ["--config", "configs/benchmark.yaml", *algorithm]


# --------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    """One finished (or failed) run.

    Attributes:
        method: algorithm name, or "sft".
        seed: training seed.
        fit_s: wall seconds of its fit (from its marker when an earlier invocation ran it).
        test_s: wall seconds of its test.
        report: the test report folder, or None.
        error: why it failed, or "".
    """

    method: str
    seed: int
    fit_s: float = 0.0
    test_s: float = 0.0
    report: Path | None = None
    error: str = ""


def cli_command(argv: Sequence[str]) -> str:
    """The shell form of a ``qoq`` call (as a user would type it)."""
    return "qoq " + " ".join(shlex.quote(a) for a in argv)


def _run_cli(argv: list[str], log: Path) -> float:
    """Run ``python -m qoq.cli argv`` with one thread; returns wall seconds; raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as out:
        out.write(cli_command(argv) + "\n\n")
        out.flush()
        proc = subprocess.run([sys.executable, "-m", "qoq.cli", *argv], cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise RuntimeError(f"exit {proc.returncode}: {cli_command(argv)}\n--- {log} (tail)\n{tail}")
    return time.perf_counter() - start


def find_report(test_dir: Path) -> Path | None:
    """The newest ``reports/test-step*`` folder with a ``metrics.csv`` under ``test_dir``, or None."""
    found = sorted(test_dir.glob("reports/test-step*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None


def run_one(plan: Plan, method: str, seed: int, say=print) -> RunResult:
    """Fit (unless its marker exists) and test (unless its report exists) one run.

    Args:
        plan: the plan.
        method: algorithm name or "sft".
        seed: training seed.
        say: progress printer.

    Returns:
        The result; failures are caught and returned in ``error``.
    """
    run = plan.run_dir(method, seed)
    result = RunResult(method, seed)
    marker = run / "fit.json"
    try:
        if marker.is_file():
            result.fit_s = json.loads(marker.read_text())["wall_s"]
        else:
            argv = plan.fit_argv(method, seed)
            say(f"[{_now()}] start fit  {method} seed {seed}")
            result.fit_s = _run_cli(argv, run / "fit.log")
            marker.write_text(json.dumps({"wall_s": result.fit_s, "command": cli_command(argv)}, indent=1))
            say(f"[{_now()}] done  fit  {method} seed {seed} in {result.fit_s:.0f} s")
        report = find_report(run / "test")
        test_marker = run / "test.json"
        if report is None or not test_marker.is_file():
            argv = plan.test_argv(method, seed)
            result.test_s = _run_cli(argv, run / "test.log")
            test_marker.write_text(
                json.dumps({"wall_s": result.test_s, "command": cli_command(argv)}, indent=1)
            )
            report = find_report(run / "test")
            say(f"[{_now()}] done  test {method} seed {seed} in {result.test_s:.0f} s")
        else:
            result.test_s = json.loads(test_marker.read_text())["wall_s"]
        if report is None:
            raise RuntimeError(f"qoq test wrote no report under {run / 'test'}")
        result.report = report
    except Exception as err:  # noqa: BLE001 - one failed run must not stop the others
        result.error = str(err)
        say(f"[{_now()}] FAILED {method} seed {seed}: {err}")
    return result


def run_all(plan: Plan, say=print) -> list[RunResult]:
    """Every SFT warm start, then every (method, seed) run, ``plan.jobs`` at a time.

    An RL run waits for its seed's SFT warm start; RL runs are ordered seed by seed so that an
    interrupted ablation leaves whole seeds behind.
    """
    lock = threading.Lock()

    def locked_say(msg: str) -> None:
        with lock:
            say(msg)

    with ThreadPoolExecutor(max_workers=max(1, plan.jobs)) as pool:
        sft: dict[int, Future] = {s: pool.submit(run_one, plan, SFT, s, locked_say) for s in plan.seeds}

        def after_sft(method: str, seed: int) -> RunResult:
            base = sft[seed].result()
            if base.error:
                return RunResult(
                    method, seed, error=f"its SFT warm start failed: {base.error.splitlines()[0]}"
                )
            return run_one(plan, method, seed, locked_say)

        rl = [pool.submit(after_sft, m, s) for s in plan.seeds for m in plan.methods]
        return [f.result() for f in (*sft.values(), *rl)]


def _now() -> str:
    return time.strftime("%H:%M:%S")


# ------------------------------------------------------------------------------------- collecting
def read_metrics(report: Path) -> dict[str, float]:
    """``name -> value`` of a report's ``metrics.csv``."""
    with (report / "metrics.csv").open(newline="") as f:
        return {
            row["name"]: float(row["value"])
            for row in csv.DictReader(f)
            if row.get("value") not in (None, "")
        }


def read_curves(run: Path) -> dict[str, dict[int, float]]:
    """Per-rollout-step training curves of a fit, from its full rollout trace (``<run>/rollouts.jsonl``).

    ``configs/benchmark.yaml`` traces every response of every step, so the curves are exact:
    ``train/reward`` (mean over the batch), ``train/reward/<domain>`` and ``train/adv_scale/<domain>``
    (mean reward and mean |advantage| of the domain's responses) exist at the steps where the domain was
    in the batch and nowhere else. (Lightning's ``metrics.csv`` repeats a key's last value on steps that
    did not log it, so per-domain columns there are not usable as curves.) Steps are numbered 0, 1, ...
    in rollout order (one per rollout batch; a batch makes ``mini_batches`` optimizer steps).

    Args:
        run: the run folder.

    Returns:
        name -> {step: value}; empty when the run has no trace.
    """
    path = run / "rollouts.jsonl"
    if not path.is_file():
        return {}
    by_step: dict[int, list[dict]] = {}
    with path.open() as f:
        for line in f:
            row = json.loads(line)
            by_step.setdefault(int(row.get("step", row.get("global_step", 0))), []).append(row)
    curves: dict[str, dict[int, float]] = {}
    for index, step in enumerate(sorted(by_step)):
        rows = by_step[step]
        curves.setdefault("train/reward", {})[index] = statistics.fmean(r["reward"] for r in rows)
        for domain in {r["domain"] for r in rows}:
            mine = [r for r in rows if r["domain"] == domain]
            curves.setdefault(f"train/reward/{domain}", {})[index] = statistics.fmean(
                r["reward"] for r in mine
            )
            curves.setdefault(f"train/adv_scale/{domain}", {})[index] = statistics.fmean(
                abs(r["advantage"]) for r in mine
            )
            curves.setdefault(f"train/responses/{domain}", {})[index] = float(len(mine))
    return curves


@dataclass
class Domain:
    """A benchmark domain as the tables show it.

    Attributes:
        name: domain name.
        train: training records.
        eval: held-out records.
        origin: "real" or "synthetic".
        rare: whether it holds less than ``rare_share`` of the training records.
    """

    name: str
    train: int
    eval: int
    origin: str
    rare: bool


def benchmark_domains(plan: Plan) -> list[Domain]:
    """The benchmark's domains, most training records first (from its ``build.json``)."""
    from qoq.data.benchmark import TASKS

    stamp = json.loads((plan.benchmark_dir / "build.json").read_text())
    train, evals = stamp["records"]["train"], stamp["records"].get("eval", {})
    total = sum(train.values())
    origin = {t.domain: t.origin for t in TASKS}
    rows = [
        Domain(d, n, evals.get(d, 0), origin.get(d, "real"), n / total < plan.rare_share)
        for d, n in train.items()
    ]
    return sorted(rows, key=lambda r: -r.train)


def domain_score(metrics: Mapping[str, float], score: str, domain: Domain) -> float:
    """A domain's score: over real records, or (synthetic domains) over its synthetic records."""
    suffix = "" if domain.origin == "real" else "_with_synthetic"
    return metrics.get(f"test/{score}{suffix}/{domain.name}", math.nan)


def rare_mean(metrics: Mapping[str, float], score: str, domains: Sequence[Domain]) -> float:
    """Unweighted mean of a score over the rare domains (NaN when there are none)."""
    values = [domain_score(metrics, score, d) for d in domains if d.rare]
    return statistics.fmean(values) if values else math.nan


# --------------------------------------------------------------------------------------- writing
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count of the finite values."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def fmt(values: Sequence[float]) -> str:
    """``mean +- std`` of the finite values (``n/a`` when none)."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "n/a"
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


@dataclass
class Table:
    """Rows of per-seed values per method, for the markdown tables."""

    methods: list[str]
    columns: list[str]
    cells: dict[tuple[str, str], list[float]] = field(default_factory=dict)

    def markdown(self) -> str:
        head = "| method | " + " | ".join(self.columns) + " |\n|---|" + "---|" * len(self.columns) + "\n"
        return head + "".join(
            f"| {m} | " + " | ".join(fmt(self.cells.get((m, c), [])) for c in self.columns) + " |\n"
            for m in self.methods
        )


def write_results(plan: Plan, results: Sequence[RunResult], *, command: str, wall_s: float,
                  load: tuple[tuple[float, ...], tuple[float, ...]]) -> Path:  # fmt: skip
    """Write ``ablation.md``, ``ablation.csv`` and ``learning_curves.png`` into ``plan.results``.

    Args:
        plan: the plan.
        results: the runs (failed ones are listed, not tabulated).
        command: the command line of this invocation.
        wall_s: wall seconds of this invocation.
        load: the machine's 1/5/15-minute load averages at the start and at the end.

    Returns:
        The path of ``ablation.md``.
    """
    out = plan.results
    out.mkdir(parents=True, exist_ok=True)
    domains = benchmark_domains(plan)
    methods = [SFT, *plan.methods]
    done = [r for r in results if r.report is not None and not r.error]
    metrics = {(r.method, r.seed): read_metrics(r.report) for r in done}

    def per_seed(method: str, fn) -> list[float]:
        return [fn(metrics[method, s]) for s in plan.seeds if (method, s) in metrics]

    _write_csv(out / "ablation.csv", results, metrics, plan)
    curves = {
        (r.method, r.seed): read_curves(plan.run_dir(r.method, r.seed)) for r in done if r.method != SFT
    }
    _plot_curves(out / "learning_curves.png", plan, curves, domains)

    rare = [d.name for d in domains if d.rare]
    synthetic = [d.name for d in domains if d.origin == "synthetic"]
    head = domains[0].name
    has_iou = any(k.startswith("test/iou") for m in metrics.values() for k in m)
    main = Table(methods, [
        "macro-F1 overall", "balanced acc. overall", "ovr acc. (paper) overall", "macro-F1 overall incl. synthetic",
        "macro-F1 worst domain", "macro-F1 rare", "balanced acc. rare", f"macro-F1 {head} (head)",
    ] + (["IoU overall"] if has_iou else []))  # fmt: skip
    getters = {
        "macro-F1 overall": lambda m: m.get("test/macro_f1/overall", math.nan),
        "balanced acc. overall": lambda m: m.get("test/balanced_accuracy/overall", math.nan),
        "ovr acc. (paper) overall": lambda m: m.get("test/ovr_accuracy/overall", math.nan),
        "macro-F1 overall incl. synthetic": lambda m: m.get("test/macro_f1_with_synthetic/overall", math.nan),
        "macro-F1 worst domain": lambda m: m.get("test/macro_f1/worst_domain", math.nan),
        "macro-F1 rare": lambda m: rare_mean(m, "macro_f1", domains),
        "balanced acc. rare": lambda m: rare_mean(m, "balanced_accuracy", domains),
        f"macro-F1 {head} (head)": lambda m: domain_score(m, "macro_f1", domains[0]),
        "IoU overall": lambda m: m.get("test/iou_with_synthetic/overall", math.nan),
    }
    for m in methods:
        for c in main.columns:
            main.cells[m, c] = per_seed(m, getters[c])

    def label(d: Domain) -> str:
        tags = (
            [f"{d.train}"] + (["rare"] if d.rare else []) + (["synthetic"] if d.origin == "synthetic" else [])
        )
        return f"{d.name} ({', '.join(tags)})"

    per_domain = {}
    for score in SCORES:
        if score == "iou" and not has_iou:
            continue
        table = Table(methods, [label(d) for d in domains])
        for m in methods:
            for d in domains:
                table.cells[m, label(d)] = per_seed(m, lambda x, d=d, score=score: domain_score(x, score, d))
        per_domain[score] = table

    paired = _paired_vs_grpo(plan, metrics, domains)
    adv = _advantage_table(plan, curves, domains)
    finished = {(r.method, r.seed) for r in done}
    failed = [r for r in results if r.error]
    fit_total = sum(r.fit_s for r in results)
    test_total = sum(r.test_s for r in results)
    generated = (
        f"Generated by `experiments/run_ablation.py` on {time.strftime('%Y-%m-%d %H:%M')}. "
        "See `experiments/README.md` for the benchmark, the setup and the discussion."
    )
    span = _span(plan, results)
    wall = (
        f"- wall time: {span / 60:.1f} min from the first run's start to the last run's end (runs of earlier, "
        f"resumed invocations included); this invocation {wall_s / 60:.1f} min; one thread per run; summed "
        f"run times: fit {fit_total / 60:.1f} min, test {test_total / 60:.1f} min"
    )
    machine = (
        f"- machine load average (1/5/15 min): start {_load(load[0])}, end {_load(load[1])} (2 cores, shared)"
    )
    counts = (
        f"- runs finished: {len(finished)} of {len(results)}; seeds {list(plan.seeds)}; "
        f"RL steps {plan.steps or 'config default'}; SFT steps {plan.sft_steps or 'config default'}"
    )
    legend = (
        "Every cell is mean ± sample std over seeds of one held-out evaluation (greedy decoding) per run. "
        f"'rare' = mean over the domains with < {plan.rare_share:.0%} of the training records "
        f"({', '.join(rare) or 'none'}). Overall, worst-domain and rare scores use real-derived domains only; "
        f"{', '.join(synthetic) or 'no domain'} is synthetic and enters only the 'incl. synthetic' column and "
        "its own per-domain column. "
        + ("" if has_iou else "IoU: not applicable (this benchmark has no region annotations).")
    )
    adv_legend = (
        "From the full rollout traces (`<run>/rollouts.jsonl`), mean ± std over seeds. GRPO gives 0 to groups "
        "whose rollouts all scored the same and an order-1 value to the others (0.75-0.87 for 0/1 rewards in "
        "groups of 4); DRPO divides by domain and cluster "
        "temperatures (small for rare or hard domains) and re-standardises over the batch."
    )
    lines = ["# DRPO vs GRPO on the qoq benchmark", "", generated, "", "The ablation:", "", "```", plan.command(),
             "```", "", f"This invocation: `{command}`", "", wall, machine,
             counts, "", legend, "", "## Overall", "", main.markdown(),
             "## Paired difference to GRPO (same seed, same SFT warm start)", "",
             "Per seed, method minus GRPO; 'wins' counts the seeds where the method is ahead.", "", paired,
             "## Per domain (training records, tags)", ""]  # fmt: skip
    for score, table in per_domain.items():
        lines += [f"### {TITLES[score]}", "", table.markdown()]
    lines += [
        "## Advantage magnitude per domain",
        "",
        adv_legend,
        "",
        adv,
        "## Runs",
        "",
        "| method | seed | fit (s) | test (s) | status |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.method} | {r.seed} | {r.fit_s:.0f} | {r.test_s:.0f} | "
              f"{'ok' if not r.error else 'FAILED: ' + r.error.splitlines()[0]} |" for r in results]  # fmt: skip
    if failed:
        lines += ["", f"{len(failed)} run(s) failed; their logs are in `<run>/fit.log` / `<run>/test.log`."]
    lines += ["", "Commands of one seed (the others differ only in the seed and folders):", "", "```"]
    seed = plan.seeds[0]
    for m in methods:
        lines += [
            _relative(cli_command(plan.fit_argv(m, seed))),
            _relative(cli_command(plan.test_argv(m, seed))),
        ]
    lines += ["```", "", "![learning curves](learning_curves.png)", ""]
    path = out / "ablation.md"
    path.write_text("\n".join(lines))
    return path


def _span(plan: Plan, results: Sequence[RunResult]) -> float:
    """Seconds from the earliest run start to the latest run end, from the runs' marker files."""
    starts, ends = [], []
    for r in results:
        run = plan.run_dir(r.method, r.seed)
        fit, test = run / "fit.json", run / "test.json"
        if fit.is_file():
            starts.append(fit.stat().st_mtime - r.fit_s)
        if test.is_file():
            ends.append(test.stat().st_mtime)
    return max(ends) - min(starts) if starts and ends else 0.0


def _relative(command: str) -> str:
    """A command with the repository's absolute path left out (commands run from the repository root)."""
    return command.replace(f"{ROOT}{os.sep}", "")


def _load(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _paired_vs_grpo(
    plan: Plan, metrics: Mapping[tuple[str, int], Mapping[str, float]], domains: Sequence[Domain]
) -> str:
    if "grpo" not in plan.methods:
        return "(GRPO not in this ablation)\n"
    columns = {
        "macro-F1 overall": lambda m: m.get("test/macro_f1/overall", math.nan),
        "balanced acc. overall": lambda m: m.get("test/balanced_accuracy/overall", math.nan),
        "macro-F1 rare": lambda m: rare_mean(m, "macro_f1", domains),
        f"macro-F1 {domains[0].name} (head)": lambda m: domain_score(m, "macro_f1", domains[0]),
    }
    rows = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for method in [m for m in plan.methods if m != "grpo"] + [SFT]:
        cells = []
        for fn in columns.values():
            diffs = [fn(metrics[method, s]) - fn(metrics["grpo", s]) for s in plan.seeds
                     if (method, s) in metrics and ("grpo", s) in metrics]  # fmt: skip
            diffs = [d for d in diffs if math.isfinite(d)]
            wins = sum(d > 1e-9 for d in diffs)
            cells.append(f"{fmt(diffs)} (wins {wins}/{len(diffs)})" if diffs else "n/a")
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _advantage_table(plan: Plan, curves: Mapping[tuple[str, int], Mapping[str, Mapping[int, float]]],
                     domains: Sequence[Domain]) -> str:  # fmt: skip
    """Mean |advantage| per response, and each domain's share of the summed |advantage|, per method."""
    magnitude = Table(list(plan.methods), [d.name for d in domains])
    share = Table([*plan.methods, "(share of responses)"], [d.name for d in domains])
    for m in plan.methods:
        runs = [c for (method, _), c in curves.items() if method == m]
        for d in domains:
            magnitude.cells[m, d.name] = [
                statistics.fmean(c[f"train/adv_scale/{d.name}"].values())
                for c in runs
                if c.get(f"train/adv_scale/{d.name}")
            ]
        for c in runs:
            mass = {d.name: _mass(c, d.name) for d in domains}
            responses = {d.name: sum(c.get(f"train/responses/{d.name}", {}).values()) for d in domains}
            for d in domains:
                if sum(mass.values()) > 0:
                    share.cells.setdefault((m, d.name), []).append(mass[d.name] / sum(mass.values()))
                if m == plan.methods[0] and sum(responses.values()) > 0:
                    share.cells.setdefault(("(share of responses)", d.name), []).append(
                        responses[d.name] / sum(responses.values())
                    )
    return (
        "Mean |advantage| of a response in the domain (over the steps where it was in the batch):\n\n"
        + magnitude.markdown()
        + "\nShare of the summed |advantage| of all responses (how the policy-gradient weight is split "
        "across domains; the last row is each domain's share of the responses themselves):\n\n"
        + share.markdown()
    )


def _mass(curves: Mapping[str, Mapping[int, float]], domain: str) -> float:
    """Summed |advantage| of a domain's responses over a run."""
    scale, count = curves.get(f"train/adv_scale/{domain}", {}), curves.get(f"train/responses/{domain}", {})
    return sum(scale[t] * count.get(t, 0.0) for t in scale)


def _write_csv(path: Path, results: Sequence[RunResult], metrics: Mapping[tuple[str, int], Mapping[str, float]],
               plan: Plan) -> None:  # fmt: skip
    names = sorted({k for m in metrics.values() for k in m})
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "status", "fit_s", "test_s", "steps", "report", *names])
        for r in results:
            m = metrics.get((r.method, r.seed), {})
            steps = 0 if r.method == SFT else (plan.steps or "config")
            report = (
                str(r.report.relative_to(ROOT))
                if r.report and r.report.is_relative_to(ROOT)
                else str(r.report or "")
            )
            writer.writerow([r.method, r.seed, "ok" if not r.error else "failed", f"{r.fit_s:.1f}", f"{r.test_s:.1f}",
                             steps, report, *(m.get(n, "") for n in names)])  # fmt: skip


def moving_average(points: Mapping[int, float], steps: Sequence[int], window: int) -> list[float]:
    """Mean of the points within ``window`` steps up to each step (NaN where there are none).

    Args:
        points: step -> value (sparse: a domain's reward exists only where it was in the batch).
        steps: the steps to evaluate at.
        window: trailing window length in steps.

    Returns:
        One value per step.
    """
    out = []
    for t in steps:
        xs = [v for s, v in points.items() if t - window < s <= t and math.isfinite(v)]
        out.append(statistics.fmean(xs) if xs else math.nan)
    return out


def _plot_curves(path: Path, plan: Plan, curves: Mapping[tuple[str, int], Mapping[str, Mapping[int, float]]],
                 domains: Sequence[Domain]) -> None:  # fmt: skip
    """Batch reward per step (trailing mean, mean over seeds) and every rollout of the two rarest domains."""
    from matplotlib.figure import Figure

    rarest = [d for d in domains if d.rare][-2:] or domains[-1:]
    steps = sorted({s for c in curves.values() for s in c.get("train/reward", {})})
    window = max(1, len(steps) // 5)
    colours = {m: f"C{i}" for i, m in enumerate(plan.methods)}
    fig = Figure(figsize=(5 * (1 + len(rarest)), 4))
    ax = fig.add_subplot(1, 1 + len(rarest), 1)
    for method in plan.methods:
        runs = [
            moving_average(c.get("train/reward", {}), steps, window)
            for (m, _), c in curves.items()
            if m == method
        ]
        if runs and steps:
            mean = [statistics.fmean(r[j] for r in runs) for j in range(len(steps))]
            ax.plot(steps, mean, color=colours[method], label=f"{method} (n={len(runs)})")
    ax.set_title("train reward, all domains (mean over seeds)", fontsize=9)
    ax.set_ylabel(f"batch reward, trailing mean over {window} steps")
    ax.legend(fontsize=8)
    for i, d in enumerate(rarest):
        ax = fig.add_subplot(1, 1 + len(rarest), i + 2)
        for (method, _), c in curves.items():
            points = c.get(f"train/reward/{d.name}", {})
            ax.scatter(list(points), list(points.values()), color=colours[method], s=18, alpha=0.7)
        ax.set_title(f"train reward: {d.name} ({d.train} records); one dot per batch it was in", fontsize=9)
        ax.set_ylabel("mean reward of its responses")
    for ax in fig.axes:
        ax.set_xlabel("rollout step (batch)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m experiments.run_ablation", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   help="configs/algorithm/<name>.yaml names (optional extras: rloo dr_grpo reinforce_pp "
                        "drpo_kmax1 drpo_kmax3 drpo_kmax20 drpo_released)")  # fmt: skip
    p.add_argument("--balancing", action="store_true",
                   help="also run the balancing methods: " + " ".join(BALANCING_METHODS))  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--steps", type=int, default=None, help="RL steps per run (default: configs/benchmark.yaml)"
    )
    p.add_argument(
        "--sft-steps", type=int, default=None, help="SFT steps (default: configs/benchmark_sft.yaml)"
    )
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    p.add_argument("--root", type=Path, default=None, help="runs folder (default runs/ablation[-smoke])")
    p.add_argument("--results", type=Path, default=None,
                   help="results folder (default experiments/results; <root>/results with --smoke)")  # fmt: skip
    p.add_argument(
        "--benchmark-dir", type=Path, default=None, help="benchmark folder (default <root>/benchmark)"
    )
    p.add_argument("--smoke", action="store_true", help="tiny benchmark, 2 steps, groups of 2 (tests)")
    p.add_argument("--report-only", action="store_true", help="only tabulate the runs that have finished")
    return p.parse_args(argv)


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The :class:`Plan` of parsed command-line arguments."""
    root = (args.root or ROOT / "runs" / ("ablation-smoke" if args.smoke else "ablation")).resolve()
    results = args.results or (root / "results" if args.smoke else ROOT / "experiments" / "results")
    methods = list(dict.fromkeys([*args.methods, *(BALANCING_METHODS if args.balancing else ())]))
    return Plan(
        methods=tuple(methods),
        seeds=tuple(args.seeds),
        steps=2 if args.smoke and args.steps is None else args.steps,
        sft_steps=2 if args.smoke and args.sft_steps is None else args.sft_steps,
        jobs=args.jobs,
        root=root,
        results=results.resolve(),
        benchmark_dir=(args.benchmark_dir or root / "benchmark").resolve(),
        counts=SMOKE_COUNTS if args.smoke else None,
        eval_per_domain=SMOKE_EVAL_PER_DOMAIN if args.smoke else 24,
        smoke=args.smoke,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or with ``--report-only`` tabulate) the ablation; returns 1 if any run failed."""
    args = parse_args(argv)
    plan = plan_from_args(args)
    for method in plan.methods:
        if not (ROOT / "configs" / "algorithm" / f"{method}.yaml").is_file():
            raise SystemExit(f"unknown method {method!r}: no configs/algorithm/{method}.yaml")
    command = "python -m experiments.run_ablation " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    start, load_start = time.perf_counter(), os.getloadavg()

    from qoq.data.benchmark import build_benchmark

    build_benchmark(plan.benchmark_dir, counts=plan.counts, eval_per_domain=plan.eval_per_domain, quiet=True)
    if args.report_only:
        results = [_finished(plan, m, s) for m in (SFT, *plan.methods) for s in plan.seeds]
        results = [r for r in results if r is not None]
    else:
        results = run_all(plan)
    path = write_results(plan, results, command=command, wall_s=time.perf_counter() - start,
                         load=(load_start, os.getloadavg()))  # fmt: skip
    print(f"[{_now()}] wrote {path}")
    return 1 if any(r.error for r in results) else 0


def _finished(plan: Plan, method: str, seed: int) -> RunResult | None:
    """A run that has a fit marker and a test report, without running anything."""
    run = plan.run_dir(method, seed)
    report = find_report(run / "test")
    if report is None or not (run / "fit.json").is_file():
        return None
    wall = {k: json.loads((run / f"{k}.json").read_text())["wall_s"] if (run / f"{k}.json").is_file() else 0.0
            for k in ("fit", "test")}  # fmt: skip
    return RunResult(method, seed, wall["fit"], wall["test"], report)


if __name__ == "__main__":
    raise SystemExit(main())
