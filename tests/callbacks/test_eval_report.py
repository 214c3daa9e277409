"""The report folder: every file exists and parses."""

import csv
import json

import pytest
from PIL import Image

from qoq.callbacks.metrics import ClinicalMetrics
from qoq.callbacks.report import console_tables, write_report


def test_report_folder(tmp_path, records):
    metrics = ClinicalMetrics.from_records(records, split="test").compute()
    out = write_report(
        tmp_path / "report",
        metrics,
        records,
        split="test",
        generation="greedy",
        checkpoint="ckpt/last.ckpt",
        run_info={"global_step": 7},
    )
    assert out == tmp_path / "report"

    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["name"]: float(r["value"]) for r in rows} == pytest.approx(metrics)

    for name in ("domains.png", "confusion_chest_covid.png", "confusion_ecg_ptbxl.png", "f1_chest_cxr.png"):
        with Image.open(out / name) as image:
            image.verify()
    assert not (out / "confusion_chest_cxr.png").exists()  # multi-label: a per-label F1 chart instead

    lines = (out / "traces.jsonl").read_text().splitlines()
    assert len(lines) == len(records)
    first = json.loads(lines[0])
    assert first["prompt_id"] == "cxr-0" and first["gold"] == ["edema", "effusion"] and first["iou"] == 0.5
    assert json.loads(lines[1])["rewards"]["iou"] is None  # NaN term -> null (valid JSON)
    assert [json.loads(line)["origin"] for line in lines].count("synthetic") == 2

    summary = (out / "summary.md").read_text()
    assert (
        "| domain | n real | n synthetic | macro-F1 | balanced accuracy | ovr_accuracy (paper) | IoU |"
        in summary
    )
    assert f"| chest | 7 | 0 | {metrics['test/macro_f1/chest']:.3f} |" in summary
    assert f"| ecg | 3 | 2 | {metrics['test/macro_f1/ecg']:.3f} |" in summary
    assert "12 (10 real, 2 synthetic)" in summary
    assert "generation: greedy" in summary and "ckpt/last.ckpt" in summary and "global_step: 7" in summary
    overall, worst = metrics["test/macro_f1/overall"], metrics["test/macro_f1/worst_domain"]
    assert f"| macro-F1 | {overall:.3f} | {worst:.3f} (chest) |" in summary
    assert "incl. synthetic" in summary and "inflate" in summary

    console = console_tables(out / "summary.md")  # what `qoq test` prints instead of every raw metric
    assert console.splitlines()[0] == "## Overall (real samples)" and f"| macro-F1 | {overall:.3f} |" in console
    assert f"| ecg | 3 | 2 | {metrics['test/macro_f1/ecg']:.3f} |" in console
    assert "Per dataset" not in console and "incl. synthetic" not in console and len(console.splitlines()) < 20


def test_report_without_records(tmp_path):
    out = write_report(tmp_path, {}, [], split="val", generation="greedy", checkpoint=None, run_info={})
    assert (out / "traces.jsonl").read_text() == ""
    with Image.open(out / "domains.png") as image:
        image.verify()
    assert "No real or synthetic samples" in (out / "summary.md").read_text()
