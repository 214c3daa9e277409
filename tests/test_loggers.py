"""The run logger keeps a resumed run's metrics.csv; a fresh run replaces it (Lightning's behaviour). Each
config stack runs in its own folder, and other loggers write nothing outside it."""

import csv
from pathlib import Path

import pytest

from qoq.loggers import RunLogger
from qoq.runs import overlay_root, place_logger_files


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_first_run(folder):
    first = RunLogger(str(folder))
    first.log_metrics({"train/reward": 0.1}, step=0)
    first.log_metrics({"train/reward": 0.2}, step=1)
    first.save()
    return folder / "metrics.csv"


def test_resumed_run_appends_and_widens_the_header(tmp_path):
    path = _write_first_run(tmp_path)
    resumed = RunLogger(str(tmp_path), keep_existing=True)
    resumed.log_metrics({"train/reward": 0.3, "test/macro_f1": 0.5}, step=2)
    resumed.save()
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["0", "1", "2"]
    assert [float(r["train/reward"]) for r in rows] == pytest.approx([0.1, 0.2, 0.3])
    assert rows[0]["test/macro_f1"] == "" and float(rows[2]["test/macro_f1"]) == 0.5


def test_fresh_run_replaces_the_file(tmp_path):
    path = _write_first_run(tmp_path)
    fresh = RunLogger(str(tmp_path))
    fresh.log_metrics({"train/reward": 0.9}, step=0)
    fresh.save()
    assert [float(r["train/reward"]) for r in _rows(path)] == [0.9]


# ----------------------------------------------------------------------------- the run folder, any logger
ROOT = Path(__file__).resolve().parents[1]


def test_overlays_get_their_own_run_folder():
    demo, grpo, hf = (str(ROOT / f) for f in ("configs/demo.yaml", "configs/algorithm/grpo.yaml", "configs/rollout/hf.yaml"))
    assert overlay_root("runs/demo", [demo], []) == "runs/demo"
    assert overlay_root("runs/demo", [demo, grpo], []) == "runs/demo-grpo"
    assert overlay_root("runs/demo", [demo, grpo, hf], []) == "runs/demo-grpo-hf"
    assert overlay_root("x", [demo, grpo], ["--trainer.default_root_dir", "x"]) == "x"  # as given
    assert overlay_root("runs/demo_sft", [grpo, str(ROOT / "configs/demo_sft.yaml")], []) == "runs/demo_sft"


def test_logger_files_go_into_the_run_folder():
    from jsonargparse import Namespace

    loggers = [
        Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(save_dir=".")),
        Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=Namespace(save_dir="./mlruns")),
        Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=Namespace(save_dir="mine")),
    ]
    place_logger_files(loggers, "runs/demo")
    assert [lg.init_args.get("save_dir") for lg in loggers] == ["runs/demo", "./mlruns", "mine"]
    assert loggers[1].init_args.tracking_uri == f"sqlite:///{Path('runs/demo').absolute()}/mlflow.db"


def _fit_with_logger(tmp_path, monkeypatch, *logger_args):
    from qoq.cli import run

    cwd, folder = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/smoke.yaml"),
         "--config", str(ROOT / "configs/rollout/hf.yaml"), "--trainer.max_steps", "2",
         "--trainer.default_root_dir", str(folder), *logger_args])
    assert sorted(p.name for p in cwd.iterdir()) == []  # nothing outside the run folder
    for name in ("config.yaml", "checkpoints/last.ckpt", "reward_curve.png", "rollouts.jsonl"):
        assert (folder / name).exists(), name
    return folder


def test_wandb_offline_run_stays_in_its_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'qoq[loggers]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    folder = _fit_with_logger(tmp_path, monkeypatch, "--trainer.logger", "WandbLogger",
                              "--trainer.logger.offline", "true", "--trainer.logger.project", "qoq-test")
    (run_files,) = list((folder / "wandb").glob("offline-run-*"))
    assert any(run_files.rglob("*.wandb"))


def test_mlflow_run_stays_in_its_folder(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'qoq[loggers]')")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folder = _fit_with_logger(tmp_path, monkeypatch, "--trainer.logger", "MLFlowLogger")
    assert (folder / "mlflow.db").is_file()
    artifacts = {p.name for p in (folder / "mlartifacts").rglob("*") if p.is_file()}
    assert {"reward_curve.png", "rollouts.jsonl"} <= artifacts
