"""Run every qoq benchmark and rewrite ``benchmarks/RESULTS.md``: machine, versions, command, figures.

    python -m benchmarks.run [--smoke] [--only step_vs_trl rollout phases drpo_cost memory] [--results PATH]

Each benchmark runs in a child process of its own (``python -m benchmarks.run --child NAME``: fresh memory,
threads and globals), which calls the benchmark module's ``run(smoke)`` and writes its figures as JSON;
this process then renders them. A benchmark that fails is reported in RESULTS.md with its error, and the
command exits non-zero. Timings are printed as numbers and ratios, never asserted. The load average
before and after each benchmark is recorded: other work on the machine makes timings noisy.

Before the first run, TRL and its missing dependencies are installed into ``.cache/bench/site-packages``
(``requirements/bench.txt``; the project's virtualenv is not touched).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import inspect
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

BENCHMARKS = ("step_vs_trl", "rollout", "phases", "drpo_cost", "memory")
TITLES = {
    "step_vs_trl": "qoq GRPO step vs TRL GRPOTrainer",
    "rollout": "Rollout throughput (vLLM vs HF) and weight sync",
    "phases": "Phases of a demo RL step",
    "drpo_cost": "DRPO cost per step vs history length",
    "memory": "Peak memory per phase vs batch size, response length and token budget",
}
DEFAULT_RESULTS = common.ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_WORKDIR = common.ROOT / ".cache" / "bench" / "results"
#: Seconds allowed per benchmark process (full, smoke).
TIMEOUTS = {
    "step_vs_trl": (2400, 400),
    "rollout": (1800, 300),
    "phases": (1200, 300),
    "drpo_cost": (900, 120),
    "memory": (900, 180),
}


def child(name: str, smoke: bool, out: Path, step_seconds: float | None = None) -> None:
    """In this process: ``benchmarks.<name>.run(smoke=...)``, its result written to ``out`` as JSON.

    Args:
        name: one of :data:`BENCHMARKS`.
        smoke: the benchmark's smoke mode.
        out: JSON file to write.
        step_seconds: reference step time handed to a ``run`` that accepts ``step_seconds`` (drpo_cost).
    """
    common.apply_env()
    module = importlib.import_module(f"benchmarks.{name}")
    kwargs: dict[str, Any] = {"smoke": smoke}
    if step_seconds is not None and "step_seconds" in inspect.signature(module.run).parameters:
        kwargs["step_seconds"] = step_seconds
    common.write_json(out, {"kwargs": kwargs, "results": module.run(**kwargs)})


def run_benchmark(
    name: str, smoke: bool, workdir: Path, step_seconds: float | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Run one benchmark in a child process; return its record (results or error, wall time, loads).

    Args:
        name: one of :data:`BENCHMARKS`.
        smoke: the benchmark's smoke mode (one intra-op thread unless ``threads`` says otherwise).
        workdir: where the JSON result and the log go.
        step_seconds: reference step time for drpo_cost.
        threads: ``OMP_NUM_THREADS`` of the child and its own children; None keeps torch's default.
    """
    out, log = workdir / f"{name}.json", workdir / f"{name}.log"
    out.unlink(missing_ok=True)
    args = ["--child", name, "--out", str(out)] + (["--smoke"] if smoke else [])
    if step_seconds is not None:
        args += ["--step-seconds", f"{step_seconds:.6g}"]
    record: dict[str, Any] = {"name": name, "load_before": common.load_average()}
    start = time.perf_counter()
    timeout = TIMEOUTS[name][1 if smoke else 0]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else (common.SMOKE_ENV if smoke else None)
    try:
        proc = common.run_module("benchmarks.run", args, timeout=timeout, log=log, env=env)
        error = None if proc.returncode == 0 and out.is_file() else f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout} s"
    record["wall_s"] = time.perf_counter() - start
    record["load_after"] = common.load_average()
    if error is None:
        data = common.read_json(out)
        record["results"], record["kwargs"] = data["results"], data["kwargs"]
    else:
        record["error"] = f"{error}; the end of {log}:\n{common.tail(log, 25)}"
    status = "FAILED" if error else "done"
    print(
        f"[run] {name}: {status} in {record['wall_s']:.0f} s (load {record['load_before']} -> "
        f"{record['load_after']})",
        flush=True,
    )
    return record


# --------------------------------------------------------------------------------------------- rendering


def render_drpo_cost(results: dict[str, Any], phases: dict[str, Any] | None = None) -> str:
    """The drpo_cost section: its rows as a table, plus DRPO's share of the real demo step (phases)."""
    lines = []
    if "step_seconds" in results:
        lines.append(
            f"Reference step: {results['step_seconds']:.3g} s (the `share` columns divide by it); "
            f"{results.get('rollouts', '?')} rollouts per question, {results.get('domains', '?')} "
            f"domains, {results.get('torch_threads', '?')} torch threads.\n"
        )
    rows = results.get("rows", [])
    lines.append(common.markdown_table(rows))
    for run in (phases or {}).get("runs", []):
        adv = run.get("phases", {}).get("advantage")
        if adv:
            lines.append(
                f"- In the real demo run ({run['variant']} rollouts, DRPO window 50, phases above) the "
                f"advantage phase took {adv['median_s'] * 1e3:.1f} ms = {adv['share']:.1%} of the step."
            )
    return "\n".join(lines) + "\n"


def render_section(record: dict[str, Any], records: dict[str, dict[str, Any]]) -> str:
    """One RESULTS.md section: title, how long it took, the benchmark's own rendering (or its error)."""
    name = record["name"]
    head = (
        f"## {TITLES[name]}\n\n`benchmarks/{name}.py` - {record['wall_s']:.0f} s, load average "
        f"{record['load_before']} before, {record['load_after']} after.\n\n"
    )
    if "error" in record:
        return head + f"**Failed**:\n\n```\n{record['error'][-3000:]}\n```\n"
    if name == "drpo_cost":
        phases = records.get("phases", {}).get("results")
        return head + render_drpo_cost(record["results"], phases)
    module = importlib.import_module(f"benchmarks.{name}")
    return head + module.render(record["results"])


def render_results(
    records: list[dict[str, Any]], info: dict[str, Any], command: str, smoke: bool, wall_s: float
) -> str:
    """The whole RESULTS.md text."""
    by_name = {r["name"]: r for r in records}
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    lines = [
        "# qoq benchmark results",
        "",
        "Generated by `python -m benchmarks.run` (see `benchmarks/README.md` for what each benchmark does",
        "and how to read it); do not edit by hand. Timings are wall-clock on the machine below and are noisy",
        "when other work runs on it: compare the load averages with the core count.",
        "",
        f"- Command: `{command}`"
        + (" (**smoke mode**: one short iteration each, figures not meaningful)" if smoke else ""),
        f"- Date: {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}, total {wall_s / 60:.1f} min",
        f"- Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM; {info['platform']}",
        f"- Python {info['python']}; {versions}",
        f"- Commit: {info['commit']}; load average at start {info['load_average']}",
        f"- Intra-op threads per process: {info.get('threads') or 'torch default (one per core)'}",
        "",
    ]
    for record in records:
        lines.append(render_section(record, by_name))
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 when a benchmark failed)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one short iteration of each benchmark")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown file to (re)write")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="JSON results and logs")
    parser.add_argument(
        "--threads", type=int, help="OMP_NUM_THREADS of every benchmark process (default: torch's, all cores)"
    )
    parser.add_argument("--child", choices=BENCHMARKS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--step-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.smoke, args.out, args.step_seconds)
        return 0

    common.apply_env()
    command = (
        "python -m benchmarks.run" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    names = [n for n in BENCHMARKS if n in (args.only or BENCHMARKS)]
    info = common.machine_info()
    start = time.perf_counter()
    if "step_vs_trl" in names:
        try:
            common.bench_site()
        except RuntimeError as exc:
            print(f"[run] TRL could not be installed; step_vs_trl will report it: {exc}", flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    for name in names:
        step_seconds = None
        phases = next((r for r in records if r["name"] == "phases" and "results" in r), None)
        if name == "drpo_cost" and phases is not None:
            vllm_runs = [r for r in phases["results"]["runs"] if "median_step_s" in r]
            step_seconds = vllm_runs[0]["median_step_s"] if vllm_runs else None
        records.append(run_benchmark(name, args.smoke, args.workdir, step_seconds, args.threads))
    info["threads"] = args.threads
    text = render_results(records, info, command, args.smoke, time.perf_counter() - start)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(text)
    print(f"[run] wrote {args.results} ({(time.perf_counter() - start) / 60:.1f} min)", flush=True)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
