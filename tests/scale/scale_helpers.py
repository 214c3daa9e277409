"""Helpers of the scale tests: a config overlay with a learning signal, run-folder readers, a rank-dump callback."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from qoq.testing import fit, make_batch, state_digest
from qoq.types import PromptBatch

ROOT = Path(__file__).resolve().parents[2]

#: A random micro policy scores 0 on accuracy; the length term (0.001 per character) gives every response
#: a distinct reward, so advantages, gradients and optimizer states are all non-trivial.
SIGNAL = """
model:
  init_args:
    reward:
      class_path: qoq.rl.rewards.RewardFn
      init_args:
        weights: {accuracy: 0.5, format: 0.1, length: 0.4}
    optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 3.0e-3, weight_decay: 0.01}}
"""


def write_signal(folder: Path) -> Path:
    """Write the :data:`SIGNAL` overlay into ``folder``; returns its path."""
    path = folder / "signal.yaml"
    path.write_text(SIGNAL)
    return path


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, as every test body runs (tests/conftest.py): module-scoped fixtures run
    before that per-test setting, and results compared bit for bit must come from the same thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def base_args(*extra: str) -> list[str]:
    """The smoke run (micro policy, HF rollouts, 2 samples x 16 tokens) plus ``extra`` arguments."""
    return [
        "--config",
        str(ROOT / "configs/demo.yaml"),
        "--config",
        str(ROOT / "configs/smoke.yaml"),
        "--config",
        str(ROOT / "configs/rollout/hf.yaml"),
        *extra,
    ]


def metrics_by_step(run_dir: Path) -> dict[int, dict[str, str]]:
    """``metrics.csv`` rows keyed by step (the training rows only)."""
    rows = csv.DictReader((run_dir / "metrics.csv").read_text().splitlines())
    return {int(r["step"]): r for r in rows if r.get("step") and r.get("train/reward")}


def traces_by_step(run_dir: Path) -> dict[int, list[tuple[Any, ...]]]:
    """Rollout traces keyed by global step: (prompt id, response, reward, advantage) per response."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    for line in (run_dir / "rollouts.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["global_step"], []).append(
            (row["prompt_id"], row["response"], row["reward"], row["advantage"])
        )
    return out


def load_ckpt(run_dir: Path) -> dict[str, Any]:
    """``<run>/checkpoints/last.ckpt``, loaded with ``weights_only=True`` (no pickled objects allowed)."""
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def nested_equal(a: Any, b: Any) -> bool:
    """Exact equality of nested dicts / lists / tensors / scalars."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b


class _RecordingEstimator:
    """Wraps an advantage estimator and keeps its last output (the global-batch advantages)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.last: torch.Tensor | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        self.last = out.advantages.detach().cpu().clone()
        return out

    def __getattr__(self, name: str) -> Any:  # needs_kl, state_dict, load_state_dict, ...
        if name == "inner":  # not set yet while the wrapper is copied: no endless recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


class RankDump(Callback):
    """Test callback: each rank appends one JSON line per step to ``<root>/rank<r>.jsonl``.

    The line holds the advantages the estimator computed over the global (all-gathered) batch and a
    digest of the estimator's state (DRPO's DomainStats) after the step.
    """

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        pl_module.advantage = _RecordingEstimator(pl_module.advantage)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        est = pl_module.advantage
        row = {
            "step": trainer.global_step,
            "world_size": trainer.world_size,
            "advantages": est.last.tolist() if est.last is not None else None,
            "state": state_digest(est.state_dict()),
        }
        path = Path(trainer.default_root_dir) / f"rank{trainer.global_rank}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def text_batch(texts: list[str], domains: list[str]) -> PromptBatch:
    """A text-only PromptBatch (answer "normal" of labels normal / abnormal) for system-level tests."""
    return make_batch(texts, domains=domains)


def fit_system(system: Any, batches: list[Any], steps: int, callbacks: list[Any] = ()) -> Any:
    """Run ``steps`` RL steps of a ``PolicyOptimization`` on CPU (no logger files); returns the trainer."""
    return fit(system, batches, steps, callbacks=list(callbacks))


class KillAt(Callback):
    """Test callback: SIGKILL its own process after training step ``step`` (a crash: no clean-up, no
    final checkpoint). Callbacks run before checkpointing, so a checkpoint due at ``step`` is not written.

    Args:
        step: global step after which the process dies.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def vllm_greedy_after_sync(policy: Any, prompts: list[torch.Tensor], workdir: Path, max_new_tokens: int = 12) -> Any:
    """Greedy rollouts of ``prompts`` (embeddings) by a real vLLM engine after a verified sync of ``policy``."""
    from qoq.rl.rollout import VLLMEngine
    from qoq.types import SamplingParams

    engine = VLLMEngine(kv_cache_gib=1)
    try:
        engine.setup(policy.lm, policy.tokenizer, workdir, eos_token_ids=policy.eos_token_ids)
        assert engine.sync_weights(policy.lm_weights_for_sync()).verified
        return engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    finally:
        engine.close()
