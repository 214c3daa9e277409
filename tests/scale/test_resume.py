"""Exact resume: a run restarted from its step-2 checkpoint reaches step 4 exactly as the uninterrupted run.

Real CLI runs (in-process): the micro policy, HF rollouts seeded per step, DRPO with KL damping, a reward
with a length term so that every quantity moves. What must carry over: weights, AdamW moments, the data
stream position, DRPO's domain history and the RNG streams. Timing columns are the only ones allowed to
differ.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scale_helpers import (
    base_args,
    load_ckpt,
    metrics_by_step,
    nested_equal,
    one_thread,
    traces_by_step,
    write_signal,
)

from qoq.cli import run

#: Columns that measure wall time, not the computation.
_TIMING = ("time/", "time_share/", "train/sync_ms")

#: Keep a checkpoint every 2 steps (as a long run would before being killed) and trace every step.
_CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: -1, every_n_train_steps: 2}
    - class_path: qoq.callbacks.RolloutTraceWriter
"""


def _assert_same_steps(full: Path, resumed: Path, steps: tuple[int, ...]) -> None:
    a, b = metrics_by_step(full), metrics_by_step(resumed)
    assert set(b) >= set(steps), f"the resumed run logged steps {sorted(b)}"
    for step in steps:
        keys = [
            k for k in b[step] if k.startswith("train/") and not k.startswith(_TIMING) and b[step][k] != ""
        ]
        assert len(keys) > 20
        diffs = {k: (a[step][k], b[step][k]) for k in keys if a[step].get(k) != b[step][k]}
        assert not diffs, f"step {step} differs after resume: {diffs}"
    assert float(a[steps[-1]]["train/grad_norm"]) > 1e-3, (
        "no learning signal: the comparison would be vacuous"
    )
    ta, tb = traces_by_step(full), traces_by_step(resumed)
    for step in steps:  # traces are keyed by the step count after the update
        assert ta[step + 1] == tb[step + 1], f"rollouts / rewards / advantages of step {step} differ"
    assert len({adv for *_, adv in ta[steps[-1] + 1]}) > 1


def _assert_same_checkpoints(full: Path, resumed: Path) -> None:
    a, b = load_ckpt(full), load_ckpt(resumed)  # weights_only=True
    assert a["global_step"] == b["global_step"] == 4
    assert nested_equal(a["state_dict"], b["state_dict"])
    assert nested_equal(a["optimizer_states"], b["optimizer_states"])
    assert nested_equal(a["qoq"], b["qoq"])  # DRPO history, domain ids, RNG state
    assert a["qoq"]["advantage"]["stats"], "DRPO history is empty"
    data_key = next(k for k in a if k.endswith("DataModule"))
    assert a[data_key]["next_batch"] == b[data_key]["next_batch"] == 4


@pytest.fixture(scope="module")
def setup_files(tmp_path_factory) -> tuple[Path, list[str]]:
    tmp = tmp_path_factory.mktemp("resume")
    callbacks = tmp / "callbacks.yaml"
    callbacks.write_text(_CALLBACKS)
    return tmp, base_args("--config", str(write_signal(tmp)), "--config", str(callbacks))


@pytest.fixture(scope="module")
def full_run(setup_files) -> Path:
    tmp, args = setup_files
    with one_thread():
        run(["fit", *args, "--trainer.default_root_dir", str(tmp / "full"), "--trainer.max_steps", "4"])
    return tmp / "full"


def test_restart_from_mid_run_checkpoint_is_exact(setup_files, full_run):
    tmp, args = setup_files
    step2 = next((full_run / "checkpoints").glob("*step=2.ckpt"))
    resumed = tmp / "resumed"
    run(
        [
            "fit",
            *args,
            "--trainer.default_root_dir",
            str(resumed),
            "--trainer.max_steps",
            "4",
            "--ckpt_path",
            str(step2),
        ]
    )
    _assert_same_steps(full_run, resumed, (2, 3))
    _assert_same_checkpoints(full_run, resumed)


@pytest.mark.slow
def test_stop_then_ckpt_path_last_is_exact(setup_files, full_run):
    """The literal workflow: ``max_steps=2``, then ``qoq fit ... --ckpt_path last`` in the same folder."""
    tmp, args = setup_files
    part = tmp / "part"
    run(["fit", *args, "--trainer.default_root_dir", str(part), "--trainer.max_steps", "2"])
    run(
        [
            "fit",
            *args,
            "--trainer.default_root_dir",
            str(part),
            "--trainer.max_steps",
            "4",
            "--ckpt_path",
            "last",
        ]
    )
    _assert_same_steps(full_run, part, (2, 3))
    _assert_same_checkpoints(full_run, part)
