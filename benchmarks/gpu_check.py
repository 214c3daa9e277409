"""GPU readiness check: one command that proves qoq's GPU path in minutes, on a machine without network.

Stages, each in child processes with its own time limit, all inside one time budget (default 450 s):

1. ``install`` - the pinned wheels of ``requirements/gpu-wheels.txt`` (``pip install --no-index --no-deps
   --target``; fetched beforehand by ``scripts/gpu_wheels.sh``), then the embedded demo set is built.
2. ``gpu_tests`` - the ``gpu``-marked tests (``tests/gpu/``).
3. ``drpo_fit`` - ``qoq fit``: DRPO on the demo data, a tiny random Qwen2.5-VL policy
   (``configs/policy/tiny_qwen2_5_vl.yaml``), HF rollouts, ``bf16-mixed`` on one GPU.
4. ``fsdp`` - the same run under ``configs/trainer/fsdp.yaml`` (FULL_SHARD, bf16, activation
   checkpointing) with two ranks sharing the one GPU: two ``torchrun`` agents of one process each, joined
   as a two-"node" job over gloo (NCCL refuses two ranks on one device; ``PolicyFSDPStrategy`` refuses one
   process, where FSDP would fall back to NO_SHARD).
5. ``throughput`` - qoq GRPO steps (:func:`benchmarks.common.fit_grpo`, HF rollouts, bf16-mixed) for
   growing Qwen2 policy sizes (:data:`SIZES`) while the budget lasts: rollout tokens/s (response tokens /
   rollout phase), training tokens/s (prompt + response tokens / the rest of the step: log-prob
   forwards, backward, optimizer) and peak GPU memory.
6. ``vllm`` - where vLLM is importable: the ``drpo_fit`` run with vLLM rollouts (the engine verifies every
   weight sync); skipped with the reason otherwise.

A stage that fails is recorded with the end of its log and the next one still runs. Results go to the
output folder: ``gpu_check.json``, ``gpu_check.md`` (a table to copy into ``benchmarks/RESULTS_GPU.md``)
and ``gpu_check.log`` (every stage's log). Work files go to ``--workdir``.

Without CUDA (or with ``--dry-run``) it checks its own plumbing instead: the wheel list (and the wheel
folder, when present), the configs of every stage parsed by the real CLI, the commands it would run, and
one tiny throughput measurement on the CPU; the default test suite runs this mode.

    bash scripts/gpu_check.sh OUT [--wheels .whl] [--budget-s 450] [--dry-run]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import common

ROOT = common.ROOT
WHEEL_LIST = ROOT / "requirements" / "gpu-wheels.txt"
STAGES = ("install", "gpu_tests", "drpo_fit", "fsdp", "throughput", "vllm")
#: Most seconds each stage may take (less when the budget runs short); throughput gets what is left.
STAGE_CAPS = {"install": 60, "gpu_tests": 75, "drpo_fit": 90, "fsdp": 90, "throughput": 300, "vllm": 75}
#: Seconds kept back at the end of the budget for writing the results.
RESERVE_S = 10
#: Seconds one throughput size is allowed at most; a size starts only with this much budget left.
SIZE_CAP_S, SIZE_MIN_S = 120, 45

#: Qwen2 policy sizes of the throughput stage (``qoq.models.TinyLM`` arguments; the run-time 512-token
#: vocabulary, so the embeddings are small): ~5M, ~0.1B, and the decoder shapes of Qwen2.5-0.5B / 1.5B / 3B.
SIZES: dict[str, dict[str, Any]] = {
    "5M": {},
    "0.1B": {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "num_kv_heads": 4},
    "0.5B": {
        "hidden_size": 896,
        "num_layers": 24,
        "num_heads": 14,
        "num_kv_heads": 2,
        "intermediate_size": 4864,
    },
    "1.5B": {
        "hidden_size": 1536,
        "num_layers": 28,
        "num_heads": 12,
        "num_kv_heads": 2,
        "intermediate_size": 8960,
    },
    "3B": {
        "hidden_size": 2048,
        "num_layers": 36,
        "num_heads": 16,
        "num_kv_heads": 2,
        "intermediate_size": 11008,
    },
}
#: Throughput workload: P prompts x n samples x max_new_tokens (EOS never sampled), steps (first = warm-up).
WORKLOAD = {"n": 8, "max_new_tokens": 128, "steps": 3}
#: The CPU plumbing check of the dry run: one tiny size, a few tokens.
DRY_SIZE = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}
DRY_WORKLOAD = {"n": 2, "max_new_tokens": 4, "steps": 2}

FIT_STEPS, FSDP_STEPS = 10, 3


# ------------------------------------------------------------------------------------------------ wheels


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheel_list(path: Path = WHEEL_LIST) -> dict[str, str]:
    """The pinned wheels: normalised name -> version.

    Raises:
        ValueError: a line is not ``name==version``, or a name repeats (names the file and line).
    """
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        if not match:
            raise ValueError(f"{path}:{number}: {raw.strip()!r} is not 'name==version'")
        name = _norm(match[1])
        if name in pins:
            raise ValueError(f"{path}:{number}: {match[1]} is listed twice")
        pins[name] = match[2]
    if not pins:
        raise ValueError(f"{path}: no wheels listed")
    return pins


def check_wheel_folder(pins: dict[str, str], folder: Path) -> list[str]:
    """Problems of a wheel folder against the pins: missing, wrong version, two of one name, unlisted."""
    found: dict[str, list[str]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        found.setdefault(_norm(name), []).append(version)
    problems = []
    for name, version in pins.items():
        versions = found.get(name, [])
        if not versions:
            problems.append(f"{name}=={version}: no wheel in {folder}")
        elif len(versions) > 1:
            problems.append(f"{name}: {len(versions)} wheels ({', '.join(versions)}); keep one")
        elif versions[0] != version:
            problems.append(f"{name}: wheel {versions[0]}, pinned {version}")
    problems += [f"{name}: wheel not in {WHEEL_LIST.name}" for name in sorted(set(found) - set(pins))]
    return problems


def install_command(folder: Path, target: Path) -> list[str]:
    """``pip install`` of every wheel in ``folder`` into ``target`` (no index, no dependency resolution)."""
    return [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index",
        "--no-deps", "--no-compile", "--upgrade", "--target", str(target),
        *sorted(str(w) for w in folder.glob("*.whl")),
    ]  # fmt: skip


# ----------------------------------------------------------------------------------------- run configs


def _overlay(path: Path, data: dict[str, Any]) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def fit_argv(stage: str, work: Path) -> list[str]:
    """``qoq fit`` arguments of a run stage ("drpo_fit", "fsdp", "vllm"); writes its overlay under ``work``.

    The dry run parses exactly these (parsing needs no GPU).
    """
    tiny_vl = str(ROOT / "configs" / "policy" / "tiny_qwen2_5_vl.yaml")
    trainer: dict[str, Any] = {
        "accelerator": "gpu",
        "devices": 1,
        "precision": "bf16-mixed",
        "max_steps": FIT_STEPS,
        "default_root_dir": str(work / "runs" / stage),
    }
    configs = ["demo.yaml", "smoke.yaml", "rollout/vllm.yaml" if stage == "vllm" else "rollout/hf.yaml"]
    if stage == "fsdp":
        configs.append("trainer/fsdp.yaml")
        trainer.update(num_nodes=2, precision="32-true", max_steps=FSDP_STEPS)  # bf16: the strategy's
        trainer["strategy"] = {
            "class_path": "qoq.strategies.PolicyFSDPStrategy",
            "init_args": {
                "sharding_strategy": "FULL_SHARD",
                "mixed_precision": "bf16",
                "activation_checkpointing": True,
                "state_dict_type": "full",
                "process_group_backend": "gloo",
            },
        }
    overlay = {"trainer": trainer, "model": {"init_args": {"policy": tiny_vl, "init_policy_from": None}}}
    argv = ["fit"]
    for name in configs:
        argv += ["--config", str(ROOT / "configs" / name)]
    return [*argv, "--config", str(_overlay(work / "configs" / f"{stage}.yaml", overlay))]


def parse_config(argv: list[str]) -> dict[str, Any]:
    """The fully resolved config of a ``qoq`` command line (``--print_config`` of the real CLI, in-process).

    Raises:
        ValueError: the CLI refused the arguments (its message included).
    """
    import yaml

    from qoq.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run([*argv, "--print_config"])
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise ValueError(f"qoq {' '.join(argv)}: {err.getvalue().strip()[-1500:]}") from None
    return yaml.safe_load(out.getvalue())


def fsdp_commands(argv: list[str], port: int) -> list[list[str]]:
    """Two torchrun agents (one rank each) that form one two-rank job on this host's one GPU."""
    return [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
         "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "qoq.cli", *argv]
        for rank in (0, 1)
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------- stages


class Budget:
    """Seconds left of the whole check's budget."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def limit(self, stage: str) -> float:
        """Seconds ``stage`` may take: its cap, or what the budget has left minus the reserve."""
        return min(STAGE_CAPS[stage], self.left() - RESERVE_S)


def _env(site: Path, work: Path) -> dict[str, str]:
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in common.BENCH_ENV.items()}}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    env["QOQ_CACHE"] = str(work / "cache")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_processes(cmds: list[list[str]], timeout: float, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmds`` at the same time (output to ``log``, ``log.1.log``, ...) within ``timeout`` seconds.

    Each command runs in a process group of its own; when one fails or time runs out, the groups still
    running are killed (a rank whose partner died would otherwise wait for it until the limit).

    Returns:
        ``ok``, ``seconds``, ``error`` (when not ok), ``log_tail`` (the end of the first failing log) and
        ``summary`` (the last line of the first log).
    """
    if timeout <= 5:
        return {"ok": False, "skipped": True, "error": "no time left in the budget", "seconds": 0.0}
    log.parent.mkdir(parents=True, exist_ok=True)
    logs = [log if i == 0 else log.with_suffix(f".{i}.log") for i in range(len(cmds))]
    start = time.monotonic()
    procs = []
    for cmd, path in zip(cmds, logs):
        with path.open("w") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            procs.append(
                subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
    while time.monotonic() - start < timeout:
        codes = [proc.poll() for proc in procs]
        if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
            break
        time.sleep(0.5)
    codes = [proc.poll() for proc in procs]
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    record: dict[str, Any] = {"ok": all(c == 0 for c in codes), "seconds": round(time.monotonic() - start, 1)}
    lines = [line for line in common.tail(logs[0], 5).splitlines() if line.strip()]
    record["summary"] = lines[-1].strip() if lines else ""
    if not record["ok"]:
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        bad = failed[0] if failed else codes.index(None)
        reason = f"exit code {codes[bad]}" if codes[bad] is not None else f"timed out after {timeout:.0f} s"
        record["error"] = f"{reason} ({logs[bad].name})"
        record["log_tail"] = common.tail(logs[bad], 30)
    return record


def _run_metrics(root: Path) -> dict[str, Any]:
    """Steps, first / last training reward and median phase times of a run's ``metrics.csv``."""
    path = root / "metrics.csv"
    if not path.is_file():
        return {}
    with path.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/reward") not in (None, "")]
    if not rows:
        return {}
    out: dict[str, Any] = {
        "steps": len(rows),
        "reward_first": float(rows[0]["train/reward"]),
        "reward_last": float(rows[-1]["train/reward"]),
    }
    for key in rows[0]:
        if key.startswith("time/"):
            values = [float(r[key]) for r in rows[1:] if r.get(key) not in (None, "")]
            out[key] = common.median(values)
    out["checkpoint"] = (root / "checkpoints" / "last.ckpt").exists()
    return out


def throughput_size(
    name: str, lm: dict[str, Any], workload: dict[str, int], accelerator: str
) -> dict[str, Any]:
    """In this process: qoq GRPO steps of one policy size; tokens/s of rollout and training, peak memory.

    Args:
        name: the size's name (reported).
        lm: ``qoq.models.TinyLM`` arguments.
        workload: ``n``, ``max_new_tokens`` and ``steps`` (the first step is left out of the medians).
        accelerator: "gpu" (bf16-mixed, peak memory from the CUDA allocator) or "cpu" (fp32, the dry run).

    Returns:
        ``params``, ``median_step_s``, ``rollout_tok_s`` (response tokens / rollout phase),
        ``train_tok_s`` (prompt + response tokens / the rest of the step minus the weight sync),
        ``peak_mem_gib``, ``eos_disabled``, ``setup_s``.
    """
    import torch

    from qoq.rl.rollout import HFEngine

    cuda = accelerator == "gpu"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = common.fit_grpo(
        lm,
        common.without_eos(HFEngine()),
        steps=workload["steps"],
        n=workload["n"],
        max_new_tokens=workload["max_new_tokens"],
        accelerator=accelerator,
        precision="bf16-mixed" if cuda else "32-true",
    )
    keep = slice(1, None) if len(res["step_s"]) > 1 else slice(None)  # the first step warms up
    steps, phases, responses = res["step_s"][keep], res["phases"][keep], res["response_tokens"][keep]
    rollout = [p.get("rollout", float("nan")) for p in phases]
    train = [s - r - p.get("sync", 0.0) for s, r, p in zip(steps, rollout, phases)]
    prompt_tokens = workload["n"] * sum(res["prompt_tokens"])
    return {
        "size": name,
        "params": res["params"],
        "rows": workload["n"] * len(res["prompt_tokens"]),
        "median_step_s": common.median(steps),
        "rollout_tok_s": common.median([t / r for t, r in zip(responses, rollout)]),
        "train_tok_s": common.median([(prompt_tokens + t) / s for t, s in zip(responses, train)]),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "eos_disabled": res["eos_disabled"],
        "setup_s": res["setup_s"],
    }


def throughput(budget: Budget, work: Path, env: dict[str, str], log: Path) -> dict[str, Any]:
    """Every size of :data:`SIZES` in a child process of its own, smallest first, while the budget lasts."""
    rows, record = [], {"ok": True, "seconds": 0.0}
    start = time.monotonic()
    end = start + budget.limit("throughput")
    for name in SIZES:
        left = min(SIZE_CAP_S, end - time.monotonic())
        if left < SIZE_MIN_S:
            record["stopped"] = f"{name} and larger not run: {left:.0f} s of the budget left"
            break
        out = work / "throughput" / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child-size", name, "--out", str(out)]
        done = run_processes([cmd], left, log.with_name(f"throughput_{name}.log"), env)
        if done["ok"] and out.is_file():
            rows.append(common.read_json(out))
        else:
            rows.append({"size": name, "error": done.get("error"), "log_tail": done.get("log_tail", "")})
            record.update(ok=False, error=f"size {name}: {done.get('error')}")
            break  # a larger size will not do better
    if not rows:
        record["ok"] = False
    record.update(rows=rows, seconds=round(time.monotonic() - start, 1))
    return record


def gpu_facts() -> dict[str, Any]:
    """The GPU, torch / CUDA versions and whether vLLM is importable (empty GPU fields without CUDA)."""
    import importlib.util

    import torch

    facts: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "vllm_installed": importlib.util.find_spec("vllm") is not None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpus=torch.cuda.device_count(),
        )
    return facts


def check(out: Path, wheels: Path, work: Path, budget_s: float, dry_run: bool) -> dict[str, Any]:
    """Run the check (or its dry run) and write ``gpu_check.{json,md,log}`` into ``out``."""
    budget = Budget(budget_s)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    site, logs = work / "site-packages", work / "logs"
    env = _env(site, work)
    results: dict[str, Any] = {
        "mode": "dry-run" if dry_run else "gpu",
        "budget_s": budget_s,
        "machine": common.machine_info(),
        "stages": {},
    }
    stages = results["stages"]
    started = time.monotonic()

    pins = read_wheel_list()
    problems = check_wheel_folder(pins, wheels) if wheels.is_dir() else [f"no wheel folder {wheels}"]
    argvs = {stage: fit_argv(stage, work) for stage in ("drpo_fit", "fsdp", "vllm")}
    port = _free_port()
    commands = {
        "install": install_command(wheels, site),
        "demo": [sys.executable, "-m", "qoq.cli", "data", "demo", "--out", str(work / "cache" / "demo")],
        "gpu_tests": [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "gpu",
            "tests/gpu",
        ],
        "drpo_fit": [sys.executable, "-m", "qoq.cli", *argvs["drpo_fit"]],
        "fsdp": fsdp_commands(argvs["fsdp"], port),
        "vllm": [sys.executable, "-m", "qoq.cli", *argvs["vllm"]],
    }
    results["commands"] = commands
    results["wheels"] = {"listed": pins, "folder": str(wheels), "problems": problems}

    if dry_run:
        stages["install"] = {
            "ok": wheels.is_dir() is False or not problems,
            "dry_run": f"{len(pins)} pinned wheels listed; folder: " + ("; ".join(problems) or "complete"),
        }
        gpu_tests = [
            f for f in (ROOT / "tests" / "gpu").glob("test_*.py") if "pytest.mark.gpu" in f.read_text()
        ]
        stages["gpu_tests"] = {"ok": bool(gpu_tests), "dry_run": f"{len(gpu_tests)} files of gpu tests"}
        for stage in ("drpo_fit", "fsdp", "vllm"):
            try:
                cfg = parse_config(argvs[stage])
                stages[stage] = {
                    "ok": True,
                    "dry_run": "config parsed",
                    "policy": cfg["model"]["init_args"]["policy"]["class_path"],
                }
            except Exception as exc:  # noqa: BLE001 - reported, the next stage still runs
                stages[stage] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        try:
            row = throughput_size("dry", DRY_SIZE, DRY_WORKLOAD, "cpu")
            stages["throughput"] = {"ok": True, "dry_run": "one tiny size on the CPU", "rows": [row]}
        except Exception:  # noqa: BLE001
            stages["throughput"] = {"ok": False, "error": traceback.format_exc(limit=6)}
    else:
        facts = gpu_facts()
        results["gpu"] = facts
        if problems:
            missing = sum("no wheel in" in p for p in problems)
            error = (
                f"no wheels in {wheels}: prepare them with scripts/gpu_wheels.sh"
                if missing == len(pins)
                else "; ".join(problems)
            )
            stages["install"] = {"ok": False, "error": error}
        else:
            stages["install"] = run_processes(
                [commands["install"]], budget.limit("install"), logs / "install.log", env
            )
            if stages["install"]["ok"]:
                demo = run_processes([commands["demo"]], budget.limit("install"), logs / "demo.log", env)
                stages["install"].update(demo_s=demo["seconds"], demo_ok=demo["ok"])
                if not demo["ok"]:
                    stages["install"].update(
                        ok=False, error="demo set: " + demo.get("error", ""), log_tail=demo.get("log_tail")
                    )
        stages["gpu_tests"] = run_processes(
            [commands["gpu_tests"]], budget.limit("gpu_tests"), logs / "gpu_tests.log", env
        )
        if stages["gpu_tests"]["ok"] and " passed" not in stages["gpu_tests"]["summary"]:
            stages["gpu_tests"].update(ok=False, error="no gpu test ran: " + stages["gpu_tests"]["summary"])

        stages["drpo_fit"] = run_processes(
            [commands["drpo_fit"]], budget.limit("drpo_fit"), logs / "drpo_fit.log", env
        )
        stages["drpo_fit"].update(_run_metrics(work / "runs" / "drpo_fit"))
        stages["fsdp"] = run_processes(commands["fsdp"], budget.limit("fsdp"), logs / "fsdp.log", env)
        stages["fsdp"].update(_run_metrics(work / "runs" / "fsdp"))
        stages["throughput"] = throughput(budget, work, env, logs / "throughput.log")
        if facts["vllm_installed"]:
            stages["vllm"] = run_processes([commands["vllm"]], budget.limit("vllm"), logs / "vllm.log", env)
            stages["vllm"].update(_run_metrics(work / "runs" / "vllm"))
        else:
            stages["vllm"] = {"ok": None, "skipped": True, "error": "vLLM is not installed on this machine"}
    results["wall_s"] = round(time.monotonic() - started, 1)
    write_results(results, out, logs)
    return results


# ---------------------------------------------------------------------------------------------- results


def render(results: dict[str, Any]) -> str:
    """The markdown summary: machine, stages, throughput table."""
    gpu = results.get("gpu", {})
    m = results["machine"]
    lines = [
        f"# qoq GPU check ({results['mode']})",
        "",
        (
            f"- GPU: {gpu.get('gpu', 'none')} ({gpu.get('gpu_memory_gib', '-')} GiB); "
            f"torch {gpu.get('torch', '-')}, CUDA {gpu.get('cuda', '-')}; "
            f"vLLM installed: {common.fmt(gpu.get('vllm_installed'))}"
        ),
        f"- Host: {m['cpu']}, {m['cores']} cores; Python {m['python']}; commit {m['commit']}",
        f"- Wall time {results['wall_s']:.0f} s of a {results['budget_s']:.0f} s budget",
        "",
    ]
    rows = []
    for stage in STAGES:
        r = results["stages"].get(stage)
        if r is None:
            continue
        status = "ok" if r.get("ok") else "skipped" if r.get("skipped") else "FAILED"
        note = r.get("dry_run") or r.get("error") or r.get("stopped") or ""
        if stage == "gpu_tests" and not note:
            note = r.get("summary", "")  # pytest's count line
        if "steps" in r:
            note = f"{r['steps']} steps, reward {r['reward_first']:.3f} -> {r['reward_last']:.3f}; " + note
        rows.append(
            {"stage": stage, "status": status, "seconds": r.get("seconds"), "notes": note.strip("; ")}
        )
    lines.append(common.markdown_table(rows))
    sizes = [r for r in results["stages"].get("throughput", {}).get("rows", []) if "params" in r]
    if sizes:
        w = DRY_WORKLOAD if results["mode"] == "dry-run" else WORKLOAD
        lines += [
            (
                f"Throughput: qoq GRPO steps, HF rollouts, {len(common.PROMPTS)} prompts x n={w['n']} x "
                f"{w['max_new_tokens']} response tokens (EOS never sampled), median of steps 2-{w['steps']}."
            ),
            "",
            common.markdown_table(
                sizes,
                ["size", "params", "median_step_s", "rollout_tok_s", "train_tok_s", "peak_mem_gib"],
                ["size", "params", "step (s)", "rollout tok/s", "training tok/s", "peak GPU memory (GiB)"],
            ),
        ]
    for stage, r in results["stages"].items():
        if r.get("log_tail"):
            lines += [f"## {stage}: end of its log", "", "```", r["log_tail"][-2500:], "```", ""]
        for row in r.get("rows", []):
            if row.get("log_tail"):
                lines += [
                    f"## throughput {row['size']}: end of its log",
                    "",
                    "```",
                    row["log_tail"][-2500:],
                    "```",
                    "",
                ]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out: Path, logs: Path) -> None:
    """``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.log`` (the stage logs joined) in ``out``."""
    common.write_json(out / "gpu_check.json", results)
    (out / "gpu_check.md").write_text(render(results))
    with (out / "gpu_check.log").open("w") as joined:
        for path in sorted(logs.glob("*.log")) if logs.is_dir() else []:
            joined.write(f"===== {path.name}\n{path.read_text(errors='replace')}\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; exits 1 when a stage failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", help="folder for gpu_check.{json,md,log}")
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="folder of the pinned wheels")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qoq-gpu-check"), help="work files")
    parser.add_argument("--budget-s", type=float, default=450.0, help="seconds for the whole check")
    parser.add_argument(
        "--dry-run", action="store_true", help="check the plumbing only (automatic without CUDA)"
    )
    parser.add_argument("--child-size", help=argparse.SUPPRESS)  # one throughput size, in this process
    parser.add_argument("--out", dest="child_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.apply_env()
    if args.child_size:
        common.write_json(
            args.child_out, throughput_size(args.child_size, SIZES[args.child_size], WORKLOAD, "gpu")
        )
        return 0
    if args.out is None:
        parser.error("give the output folder")
    import torch

    dry_run = args.dry_run or not torch.cuda.is_available()
    if dry_run and not args.dry_run:
        print("[gpu_check] no CUDA device: dry run (plumbing, wheel list, configs)", flush=True)
    if args.workdir.exists() and not dry_run:
        shutil.rmtree(args.workdir / "runs", ignore_errors=True)
    results = check(args.out, args.wheels, args.workdir, args.budget_s, dry_run)
    print(render(results), flush=True)
    return 0 if all(r.get("ok") is not False for r in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
