"""The bad-input corpus: every case fails naming the file (and line), or is skipped and counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from qoq.data.errors import DataError, SkipCounter
from qoq.data.loaders import ECGSpec, read_ecg, read_frames, read_image
from qoq.data.manifest import read_manifest


def line(rid: str, **over) -> str:
    obj = {"id": rid, "problem": "<image> Finding?", "answer": "normal", "labels": ["normal", "abnormal"],
           "domain": "ct", "dataset": "toy", "images": ["good.dcm"]}  # fmt: skip
    obj.update(over)
    return json.dumps(obj)


@pytest.fixture
def corpus(tmp_path: Path, dcm) -> Path:
    """A folder with one good DICOM and one bad file of each kind."""
    shutil.copy(dcm("CT_small.dcm"), tmp_path / "good.dcm")
    data = (tmp_path / "good.dcm").read_bytes()
    (tmp_path / "truncated.dcm").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    (tmp_path / "stub.dcm").write_bytes(data[:100])  # not even a header
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "transposed.npy", rng.normal(size=(2500, 8)))
    np.save(tmp_path / "short.npy", rng.normal(size=(8, 1000)))
    np.save(tmp_path / "badrate.npy", rng.normal(size=(8, 5000)))
    (tmp_path / "badrate.json").write_text(json.dumps({"sample_rate": 0, "leads": list(ECGSpec().leads)}))
    np.save(tmp_path / "norate.npy", rng.normal(size=(8, 5000)))
    (tmp_path / "norate.json").write_text(json.dumps({"leads": list(ECGSpec().leads)}))
    np.save(tmp_path / "textrate.npy", rng.normal(size=(8, 5000)))
    (tmp_path / "textrate.json").write_text(
        json.dumps({"sample_rate": "fast", "leads": list(ECGSpec().leads)})
    )
    return tmp_path


def test_truncated_dicom(corpus):
    with pytest.raises(DataError) as info:
        read_image(corpus / "truncated.dcm")
    assert info.value.reason == "corrupt_dicom" and info.value.path == str(corpus / "truncated.dcm")
    with pytest.raises(DataError, match="corrupt_dicom|cannot parse") as info:
        read_frames(corpus / "stub.dcm", 2)
    assert info.value.reason == "corrupt_dicom" and str(corpus / "stub.dcm") in str(info.value)


def test_unreadable_and_missing_files(corpus):
    with pytest.raises(DataError) as info:
        read_image(corpus / "garbage.png")
    assert (info.value.reason, info.value.path) == ("unreadable_file", str(corpus / "garbage.png"))
    with pytest.raises(DataError) as info:
        read_image(corpus / "nope.png")
    assert (info.value.reason, info.value.path) == ("missing_file", str(corpus / "nope.png"))
    with pytest.raises(DataError) as info:
        read_ecg(corpus / "nope_record")
    assert info.value.reason == "missing_file"


@pytest.mark.parametrize(
    ("name", "reason", "text"),
    [
        ("transposed.npy", "ecg_shape", "looks transposed"),
        ("short.npy", "ecg_shape", "4.000 s of signal, 10 s needed"),
        ("badrate.npy", "ecg_rate", "invalid sample rate 0"),
        ("norate.npy", "ecg_rate", "no 'sample_rate'"),
        ("textrate.npy", "ecg_rate", "invalid sample rate 'fast'"),
    ],
)
def test_bad_ecgs(corpus, name, reason, text):
    with pytest.raises(DataError) as info:
        read_ecg(corpus / name, ECGSpec())
    assert info.value.reason == reason and text in str(info.value)
    assert Path(info.value.path).stem == Path(name).stem  # the array or its sidecar


def test_ecg_missing_lead_and_nan(corpus):
    with pytest.raises(DataError) as info:
        read_ecg(
            corpus / "short.npy",
            ECGSpec(leads=("I", "aVR"), sample_rate=100, seconds=1.0),
            leads=list("ABCDEFGH"),
        )
    assert info.value.reason == "ecg_leads" and "['I', 'aVR']" in str(info.value)
    x = np.ones((8, 2500))
    x[3, 7] = np.nan
    np.save(corpus / "nan.npy", x)
    with pytest.raises(DataError, match="NaN"):
        read_ecg(corpus / "nan.npy")


def test_manifest_fails_fast_naming_file_line_and_field(corpus):
    manifest = corpus / "manifest.jsonl"
    manifest.write_text("\n".join([line("ok"), line("bad", answer="pneumonia")]) + "\n")
    with pytest.raises(DataError) as info:
        read_manifest(manifest)
    err = info.value
    assert (err.reason, err.path, err.line, err.field) == ("answer_not_in_labels", str(manifest), 2, "answer")
    assert (
        str(err)
        == f"{manifest}:2: field 'answer': 'pneumonia' is not in the label set ['normal', 'abnormal']"
    )

    manifest.write_text(line("ok") + "\n{not json\n")
    with pytest.raises(DataError) as info:
        read_manifest(manifest)
    assert (info.value.reason, info.value.line) == ("malformed_json", 2)
    assert str(info.value).startswith(f"{manifest}:2: invalid JSON")

    manifest.write_text(line("ok", images=["missing.png"]) + "\n")
    with pytest.raises(DataError) as info:
        read_manifest(manifest)
    assert (info.value.reason, info.value.line, info.value.field) == ("missing_file", 1, "images")
    assert len(read_manifest(manifest, check_files=False)) == 1


def test_empty_manifests(corpus):
    empty = corpus / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError) as info:
        read_manifest(empty)
    assert (info.value.reason, info.value.path) == ("empty_manifest", str(empty))
    with pytest.raises(DataError) as info:
        read_manifest(corpus / "absent.jsonl")
    assert info.value.reason == "missing_file"
    only_bad = corpus / "bad.jsonl"
    only_bad.write_text("{oops\n")
    with pytest.raises(DataError) as info:
        read_manifest(only_bad, skip_invalid=True)
    assert info.value.reason == "empty_manifest" and "malformed_json: 1" in str(info.value)


def test_skip_invalid_counts_every_reason(corpus, caplog):
    lines = [
        line("good"),
        "{not json",
        line("missing", images=["missing.dcm"]),
        line("unreadable", images=["garbage.png"]),
        line("corrupt", images=["truncated.dcm"]),
        line("short-ecg", problem="<ecg> Rhythm?", images=[], time_series=["short.npy"]),
        line("transposed-ecg", problem="<ecg> Rhythm?", images=[], time_series=["transposed.npy"]),
        line("bad-rate", problem="<ecg> Rhythm?", images=[], time_series=["badrate.npy"]),
        line("label", answer="pneumonia"),
        line("placeholders", problem="Finding?"),
        line("good"),
    ]
    manifest = corpus / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    counter = SkipCounter()
    records = read_manifest(manifest, skip_invalid=True, check_files="load", counter=counter)
    assert [r.id for r in records] == ["good"]
    assert counter.as_dict() == {
        "ecg_shape": 2, "malformed_json": 1, "missing_file": 1, "unreadable_file": 1, "corrupt_dicom": 1,
        "ecg_rate": 1, "answer_not_in_labels": 1, "placeholder_mismatch": 1, "duplicate_id": 1,
    }  # fmt: skip
    assert f"{manifest}:5: field 'images': cannot" in counter.examples["corrupt_dicom"]
    assert str(corpus / "truncated.dcm") in counter.examples["corrupt_dicom"]
    assert f"{manifest}:6: field 'time_series'" in counter.examples["ecg_shape"]
    assert "skipping" in caplog.text and f"{manifest}:2" in caplog.text
    # without loading, only the checks that need no decoding apply
    quick = read_manifest(manifest, skip_invalid=True, counter=SkipCounter())
    assert [r.id for r in quick] == [
        "good",
        "unreadable",
        "corrupt",
        "short-ecg",
        "transposed-ecg",
        "bad-rate",
    ]


@pytest.fixture
def mixed_manifest(corpus: Path) -> Path:
    """Two good records and one bad record of each kind the issue lists, each on its own line."""
    rng = np.random.default_rng(1)
    spec = {"sample_rate": 500, "leads": list(ECGSpec().leads)}
    for name in ("good_ecg", "nan_ecg"):
        signal = rng.normal(size=(8, 5000))
        if name == "nan_ecg":
            signal[3, 100] = np.nan
        np.save(corpus / f"{name}.npy", signal)
        (corpus / f"{name}.json").write_text(json.dumps(spec))
    (corpus / "empty.png").write_bytes(b"")
    ecg = {"domain": "ecg", "images": [], "problem": "<ecg> Rhythm?"}
    lines = [
        line("good-ct"),
        line("corrupt-dicom", images=["truncated.dcm"]),
        line("empty-image", images=["empty.png"]),
        line("good-ecg", **ecg, time_series=["good_ecg.npy"]),
        line("nan-ecg", **ecg, time_series=["nan_ecg.npy"]),
        line("wrong-shape-ecg", **ecg, time_series=["transposed.npy"]),
    ]
    path = corpus / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_check_lists_every_bad_record_in_one_pass(mixed_manifest, capsys):
    from qoq.data.command import main

    assert main(["check", str(mixed_manifest)]) == 1
    out = capsys.readouterr().out.splitlines()
    bad = [o for o in out if o.startswith(str(mixed_manifest))]
    assert [o.split(":")[1] for o in bad] == ["2", "3", "5", "6"], out
    assert "corrupt_dicom" in bad[0] and "truncated.dcm" in bad[0]
    assert "empty.png" in bad[1] and "NaN" in bad[2] and "transposed.npy" in bad[3]
    assert out[-1] == "2 good, 4 bad record(s) in 1 manifest(s)"


def test_data_module_finds_bad_files_at_setup(mixed_manifest):
    from qoq.data.datamodules import ClinicalDataModule

    with pytest.raises(DataError, match=rf"{mixed_manifest}:2: field 'images'.*truncated.dcm"):
        ClinicalDataModule(manifests=[str(mixed_manifest)]).setup("fit")


def test_skip_invalid_drops_bad_records_for_good_and_lists_them(mixed_manifest, tmp_path):
    from types import SimpleNamespace

    from qoq.data.datamodules import ClinicalDataModule

    dm = ClinicalDataModule(manifests=[str(mixed_manifest)], skip_invalid=True, val_fraction=0.0)
    run = str(tmp_path / "run")
    dm.trainer = SimpleNamespace(is_global_zero=True, global_rank=0, world_size=1, default_root_dir=run)
    dm.setup("fit")
    assert sorted(r.id for r in dm.train_records) == ["good-ct", "good-ecg"]
    assert dm.skip_counter.total == 4
    listed = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"]) for e in listed][0] == (2, "corrupt_dicom")
    assert {e["file"] for e in listed} == {str(mixed_manifest)} and len(listed) == 4


def test_a_record_that_fails_while_training_is_counted_once(corpus):
    from qoq.data.dataset import ClinicalDataset
    from qoq.data.records import Record

    record = Record.from_json(json.loads(line("late", images=["good.dcm"])), base_dir=corpus)
    dataset = ClinicalDataset([record], skip_invalid=True)
    (corpus / "good.dcm").write_bytes(b"")  # the file broke after the manifest was checked
    assert dataset[0] is None and dataset[0] is None
    assert dataset.counter.total == 1
