"""``qoq data``: demo, import and stats through ``main([...])``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qoq.data.command import main
from qoq.data.manifest import read_manifest, write_manifest
from qoq.data.records import Record


def test_demo_builds_and_reports(tmp_path_factory: pytest.TempPathFactory, capsys) -> None:
    out = tmp_path_factory.getbasetemp() / "qoq-demo"  # the session's shared build (reused when present)
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "qoq demo set" in printed
        and "mammography" in printed
        and f"manifest: {out / 'manifest.jsonl'}" in printed
    )
    assert len(read_manifest(out / "manifest.jsonl")) > 50


def test_stats_counts_domains_labels_and_origins(tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "x.png")
    records = [
        Record(
            id=str(i),
            problem="<image> Which? Options: a, b.",
            answer=(answer,),
            labels=("a", "b"),
            domain=domain,
            dataset="toy",
            images=(str(tmp_path / "x.png"),),
            origin=origin,
        )
        for i, (domain, answer, origin) in enumerate(
            [
                ("fundus", "a", "real"),
                ("fundus", "a", "real"),
                ("fundus", "b", "synthetic"),
                ("ecg", "b", "real"),
            ]
        )
    ]
    manifest = write_manifest(records, tmp_path / "m.jsonl")
    assert main(["stats", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "4 records" in out
    fundus_row = next(
        line for line in out.splitlines() if line.strip("│ ").startswith("fundus") and "│" in line
    )
    assert [cell.strip() for cell in fundus_row.strip("│").split("│")] == ["fundus", "1", "2", "1"]
    label_rows = {tuple(line.split()) for line in out.splitlines()}  # label_counts' text table
    assert {("fundus", "toy", "a", "2"), ("fundus", "toy", "b", "1"), ("ecg", "toy", "b", "1")} <= label_rows
    assert "3 (2 real, 1 synthetic)" in out


def test_stats_of_a_missing_manifest_fails_naming_it(tmp_path: Path, capsys) -> None:
    assert main(["stats", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl" in capsys.readouterr().err


def test_import_climb_writes_a_manifest(tmp_path: Path, capsys) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    entries = [
        {
            "images": ["a.png"],
            "conversations": [
                {"from": "human", "value": "<image> Normal? Options: yes, no."},
                {"from": "gpt", "value": "yes"},
            ],
        },
        {
            "images": ["a.png"],
            "conversations": [
                {"from": "human", "value": "<image> Normal? Options: yes, no."},
                {"from": "gpt", "value": "no"},
            ],
        },
    ]
    (tmp_path / "climb.json").write_text(json.dumps(entries))
    out = tmp_path / "out" / "climb.jsonl"
    argv = [
        "import",
        "climb",
        str(tmp_path / "climb.json"),
        "--out",
        str(out),
        "--set",
        "domain=fundus",
        "--set",
        "dataset=toy",
        "--set",
        'labels=["yes", "no"]',
    ]
    assert main(argv) == 0
    records = read_manifest(out)
    assert [r.answer for r in records] == [("yes",), ("no",)]
    assert {(r.domain, r.dataset, r.labels) for r in records} == {("fundus", "toy", ("yes", "no"))}
    assert "wrote 2 records" in capsys.readouterr().out
    assert main(["import", "climb", str(tmp_path / "climb.json"), "--out", str(out), "--set", "bogus"]) == 1


def test_help_lists_the_commands_and_importers(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["import", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for kind in ("ptbxl", "busi", "ham10000", "chexpert", "climb"):
        assert f"  {kind}:" in out
    with pytest.raises(SystemExit):
        main([])
