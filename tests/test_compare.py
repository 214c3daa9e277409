"""`qoq compare`: runs side by side from their metrics.csv and latest test report."""

import csv
from pathlib import Path

import pytest
from PIL import Image

from qoq.cli import main


def _run(folder: Path, rewards: list[float], f1: dict[str, float]) -> Path:
    folder.mkdir(parents=True)
    with (folder / "metrics.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "step", "train/reward", "train/reward/ct", "test/macro_f1/overall"])
        writer.writerows([0, s, r, r / 2 if s % 2 else "", ""] for s, r in enumerate(rewards))
        writer.writerow([0, len(rewards), "", "", 0.9])  # an evaluation row: no training reward
    for step, scale in ((3, 0.5), (len(rewards), 1.0)):  # the latest report counts
        report = folder / "reports" / f"test-step{step}"
        report.mkdir(parents=True)
        rows = [("test/macro_f1/overall", scale * sum(f1.values()) / len(f1))]
        rows += [(f"test/macro_f1/{d}", scale * v) for d, v in f1.items()]
        with (report / "metrics.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([("name", "value"), *rows])
    return folder


def test_compare_two_runs(tmp_path: Path, capsys) -> None:
    drpo = _run(tmp_path / "demo", [0.1] * 5 + [0.5] * 5, {"ct": 0.4, "ecg": 0.2})
    grpo = _run(tmp_path / "demo-grpo", [0.2] * 10, {"ct": 0.3})
    assert main(["compare", str(drpo), str(grpo), "--out", str(tmp_path / "cmp")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| run | steps | reward start | reward end | macro-F1 | bal. acc. | IoU | F1 ct | F1 ecg |")
    assert lines[2] == "| demo | 10 | 0.100 | 0.500 | 0.300 | - | - | 0.400 | 0.200 |"
    assert lines[3] == "| demo-grpo | 10 | 0.200 | 0.200 | 0.300 | - | - | 0.300 | - |"
    assert "test-step10" in (tmp_path / "cmp" / "comparison.md").read_text()
    with Image.open(tmp_path / "cmp" / "comparison.png") as image:
        image.verify()


def test_compare_names_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert "qoq compare: error:" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp"), "--debug"])
