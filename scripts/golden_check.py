"""Golden check of the RL step: 10 DRPO steps of the demo, recorded once, compared bit for bit later.

Runs ``configs/demo.yaml`` with HF rollouts (``configs/rollout/hf.yaml``), the mini policy built from its
seed (no SFT warm start), ``seed_everything: 0``, one intra-op thread, and a reward with a length term
(0.001 per character: a random policy scores 0 on accuracy, and without it most advantages would be
zero and the check vacuous). Per step it keeps every response's text digest, reward, reward components
and advantage, and every logged ``train/*`` metric (losses, clip fraction, KL, grad norm, DRPO's
temperatures, ...) except wall times; at the end a SHA-256 digest of the final weights, of the optimizer
state and of the estimator state (DRPO's history), with a per-tensor sum of the weights for diagnosis.
A second variant, ``split``, runs 10 RL steps of two epochs x two mini-batches x micro-batches of 6 with
truncated IS (the update's paths the demo does not take).

Bit-exactness holds on one machine only: the same CPU (kernels differ with AVX-512 / bf16 / AMX support
and between vendors), the same torch and transformers versions, one thread. The reference file is
therefore a record of *this* machine (recorded before the issue-17 redesign, commit 1230bab); on another
machine, check out the old commit, ``record`` there, then ``compare`` the new code. It is not part of the
default test suite for that reason.

Usage::

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/golden_check.py record  [--out scripts/golden/demo_drpo.json]
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/golden_check.py compare [--ref scripts/golden/demo_drpo.json]

``compare`` exits 0 when everything is identical and prints the first differences otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from qoq.testing import state_digest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "scripts" / "golden" / "demo_drpo.json"  # {variant: record}
STEPS = 10

#: The overlay on configs/demo.yaml + configs/rollout/hf.yaml.
OVERLAY = """
trainer:
  max_steps: {steps}
  callbacks:
    - class_path: golden_check.GoldenRecorder
      init_args: {{out: {out}}}
model:
  init_args:
    init_policy_from: null
    trace_every: 1
    reward:
      class_path: qoq.rl.rewards.RewardFn
      init_args:
        weights: {{accuracy: 0.5, format: 0.1, length: 0.4}}
"""

#: Variants: name -> extra overlay. ``split`` covers the update's paths the demo does not take: two
#: epochs of two mini-batches each (old log-probs partly from the first gradient pass), micro-batches,
#: and the truncated-IS mismatch correction.
VARIANTS = {
    "demo": "",
    "split": """
trainer:
  max_steps: 40  # optimizer steps: 4 per RL step
model:
  init_args:
    ppo_epochs: 2
    mini_batches: 2
    micro_batch_size: 6
    loss: {eps_low: 0.2, eps_high: 0.2, kl_coef: 0.001, agg: token_mean, mismatch: token_tis}
""",
}

#: Logged metrics that measure wall time, not the computation.
_TIMING = ("time/", "time_share/", "train/sync_ms")


class GoldenRecorder(Callback):
    """Keeps each step's responses, rewards, advantages and metrics, and the final state's digests."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        trace = pl_module.last_rollout_trace or []
        metrics = {
            k: float(v)
            for k, v in sorted(trainer.logged_metrics.items())
            if k.startswith("train/") and not k.startswith(_TIMING)
        }
        self.steps.append(
            {
                "step": trainer.global_step,
                "responses": [hashlib.sha256(r["response"].encode()).hexdigest()[:16] for r in trace],
                "rewards": [r["reward"] for r in trace],
                "components": [r["components"] for r in trace],
                "advantages": [r["advantage"] for r in trace],
                "metrics": metrics,
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        weights = {k: v for k, v in pl_module.policy.state_dict().items()}
        self.final = {
            "weights": state_digest(weights),
            "optimizer": state_digest(trainer.optimizers[0].state_dict()),
            "estimator": state_digest(pl_module.advantage.state_dict()),
            "weight_sums": {k: float(v.double().sum()) for k, v in sorted(weights.items())},
        }
        record = {"steps": self.steps, "final": self.final, "torch": torch.__version__}
        Path(self.out).write_text(json.dumps(record))


def run_demo(variant: str) -> dict[str, Any]:
    """Run the 10 steps of ``variant`` in-process (one thread) and return the record."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(1)
    from qoq.cli import run

    with tempfile.TemporaryDirectory() as tmp:
        overlay = Path(tmp) / "golden.yaml"
        out = Path(tmp) / "record.json"
        overlay.write_text(OVERLAY.format(out=json.dumps(str(out)), steps=STEPS))
        extra = Path(tmp) / "variant.yaml" if VARIANTS[variant] else None
        if extra:
            extra.write_text(VARIANTS[variant])
        run(
            [
                "fit",
                "--config", str(ROOT / "configs/demo.yaml"),
                "--config", str(ROOT / "configs/rollout/hf.yaml"),
                "--config", str(overlay),
                *(["--config", str(extra)] if extra else []),
                "--trainer.default_root_dir", str(Path(tmp) / "run"),
            ]
        )  # fmt: skip
        return json.loads(out.read_text())


def _canon(value: Any) -> str:
    """A value as canonical JSON text: equal texts are equal values, NaN included."""
    return json.dumps(value, sort_keys=True)


def differences(ref: dict[str, Any], new: dict[str, Any], limit: int = 20) -> list[str]:
    """Human-readable differences between two records (empty when identical)."""
    out: list[str] = []
    if len(ref["steps"]) != len(new["steps"]):
        out.append(f"steps: {len(ref['steps'])} recorded, {len(new['steps'])} now")
    for a, b in zip(ref["steps"], new["steps"]):
        for key in ("responses", "rewards", "components", "advantages"):
            rows_a, rows_b = [_canon(x) for x in a[key]], [_canon(x) for x in b[key]]
            if rows_a != rows_b:
                bad = [i for i, (x, y) in enumerate(zip(rows_a, rows_b)) if x != y]
                out.append(f"step {a['step']} {key}: rows {bad[:5]} differ ({len(rows_a)} recorded, {len(rows_b)} now)")
        for k in sorted(set(a["metrics"]) | set(b["metrics"])):
            x, y = a["metrics"].get(k), b["metrics"].get(k)
            if _canon(x) != _canon(y):
                out.append(f"step {a['step']} {k}: {x!r} recorded, {y!r} now")
    for key in ("weights", "optimizer", "estimator"):
        if ref["final"][key] != new["final"][key]:
            out.append(f"final {key} digest differs")
    return out[:limit]


def main(argv: list[str] | None = None) -> int:
    """``record`` or ``compare``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["record", "compare"])
    parser.add_argument("--ref", "--out", dest="ref", default=str(REFERENCE))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args(argv)
    records = {v: json.loads(json.dumps(run_demo(v))) for v in args.variants}  # JSON round trip
    ref_path = Path(args.ref)
    if args.mode == "record":
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        ref_path.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
        print(f"recorded {', '.join(records)} ({STEPS} steps each) in {ref_path}")
        return 0
    refs = json.loads(ref_path.read_text())
    failed = False
    for variant, record in records.items():
        ref = refs[variant]
        if ref.get("torch") != record["torch"]:
            print(f"note: {variant} recorded with torch {ref.get('torch')}, now {record['torch']}")
        diffs = differences(ref, record)
        if diffs:
            failed = True
            print(f"golden check {variant} FAILED:\n  " + "\n  ".join(diffs))
        else:
            print(f"golden check {variant} passed: {len(record['steps'])} steps and the final state are bit-identical")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
