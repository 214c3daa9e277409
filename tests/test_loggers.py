"""The run logger keeps a resumed run's metrics.csv; a fresh run replaces it (Lightning's behaviour)."""

import csv

import pytest

from qoq.loggers import RunLogger


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
