"""Exact resume: a run restarted from its step-2 checkpoint reaches step 4 exactly as the uninterrupted run,
also after the process was killed between two checkpoints; and resuming never silently does something else.

Real CLI runs (in-process): the micro policy, HF rollouts seeded per step, DRPO with KL damping, a reward
with a length term so that every quantity moves. What must carry over: weights, AdamW moments, the data
stream position, DRPO's domain history and the RNG streams. Timing columns are the only ones allowed to
differ.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from scale_helpers import (
    ROOT,
    base_args,
    load_ckpt,
    metrics_by_step,
    nested_equal,
    one_thread,
    traces_by_step,
    write_signal,
)

from qoq.cli import main, run

#: Columns that measure wall time, not the computation.
_TIMING = ("time/", "time_share/", "train/sync_ms")

#: Keep a checkpoint every 2 steps (as a long run would before being killed) and trace every step.
_CALLBACKS = """
trainer:
  callbacks:
    - class_path: qoq.callbacks.RunCheckpoint
      init_args: {save_top_k: -1, every_n_train_steps: 2}
    - class_path: qoq.callbacks.RolloutTraceWriter
"""

#: The same run, killed (SIGKILL) after step 3: its last checkpoint is step 2's.
_KILLED = _CALLBACKS + """    - class_path: scale_helpers.KillAt
      init_args: {step: 3}
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


def test_killed_between_checkpoints_then_ckpt_path_last_is_exact(setup_files, full_run):
    """A crash at step 3 (checkpoint at 2), then ``--ckpt_path last``: the steps after the checkpoint are
    redone exactly, and metrics.csv / rollouts.jsonl keep one row per step (the killed run's rows of the
    redone steps are dropped)."""
    tmp, args = setup_files
    killed = tmp / "killed"
    overlay = tmp / "killed.yaml"
    overlay.write_text(_KILLED)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "scale"), str(ROOT)]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "qoq.cli", "fit", *args, "--config", str(overlay)]
    command += ["--trainer.default_root_dir", str(killed), "--trainer.max_steps", "4"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert load_ckpt(killed)["global_step"] == 2
    with one_thread():
        run(["fit", *args, "--trainer.default_root_dir", str(killed), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    _assert_same_steps(full_run, killed, (2, 3))
    _assert_same_checkpoints(full_run, killed)
    rows = csv.DictReader((killed / "metrics.csv").read_text().splitlines())
    assert sorted(int(r["step"]) for r in rows if r.get("train/reward")) == [0, 1, 2, 3]
    assert traces_by_step(killed) == traces_by_step(full_run)


def test_ckpt_path_last_without_a_checkpoint_is_an_error(tmp_path, capsys):
    code = main(["fit", *base_args(), "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", "last"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"--ckpt_path last: no checkpoint to resume in {tmp_path / 'checkpoints'}" in err
    assert "Traceback" not in err and not (tmp_path / "metrics.csv").exists()


def test_resuming_with_other_model_settings_lists_the_differences(setup_files, full_run, capsys):
    _, args = setup_files
    code = main(["fit", *args, "--trainer.default_root_dir", str(full_run), "--ckpt_path", "last",
                 "--model.init_args.optimizer.init_args.lr", "0.5", "--model.init_args.loss.kl_coef", "0.0"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.init_args.optimizer.init_args.lr: 0.003 in the checkpoint, 0.5 now" in err
    assert "model.init_args.loss.kl_coef: 0.001 in the checkpoint, 0.0 now" in err


def test_a_checkpoint_whose_saved_settings_do_not_parse_is_used_with_the_given_ones(
    setup_files, full_run, tmp_path, capsys
):
    """A checkpoint written by an older qoq (its saved model settings no longer parse) still evaluates: the
    settings on the command line are used and the user is told they were not compared."""
    import torch

    _, args = setup_files
    ckpt = torch.load(full_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ckpt["hyper_parameters"]["policy"]["init_args"]["an_option_of_an_older_qoq"] = 1
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    code = main(["test", *args, "--trainer.default_root_dir", str(tmp_path / "eval"), "--ckpt_path", str(old),
                 "--trainer.limit_test_batches", "1"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert f"the model settings saved in {old} do not parse with this version of qoq" in err
    assert "Parsing of ckpt_path hyperparameters failed" not in err
