"""Record validation, manifests (read / write / move) and the CLIMB importer."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from qoq.data.errors import DataError, SkipCounter
from qoq.data.manifest import import_climb, read_manifest, write_manifest
from qoq.data.records import Record

LABELS = ["normal", "pneumonia", "effusion"]


def obj(**over) -> dict:
    base = {
        "id": "r1",
        "problem": "<image> Which finding? Options: normal, pneumonia, effusion.",
        "answer": "Pneumonia",
        "labels": LABELS,
        "domain": "chest_xray",
        "dataset": "toy",
        "images": ["img/a.png"],
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def test_from_json_resolves_paths_and_normalises_answer(tmp_path):
    r = Record.from_json(
        obj(answer="PNEUMONIA, effusion", bbox=[1, 2, 3, 4]), base_dir=tmp_path, where="m.jsonl"
    )
    assert r.images == (str(tmp_path / "img" / "a.png"),)
    assert r.answer == ("pneumonia", "effusion")  # the label set's spelling and order of the answer
    assert r.labels == tuple(LABELS)
    assert r.bbox == ((1.0, 2.0, 3.0, 4.0),)  # one flat box accepted
    assert r.origin == "real"


def test_to_json_relative_round_trip(tmp_path):
    r = Record.from_json(obj(answer=["effusion", "normal"], segmentation_path="m/a.png"), base_dir=tmp_path)
    out = r.to_json(relative_to=tmp_path)
    assert out["images"] == ["img/a.png"] and out["segmentation_path"] == "m/a.png"
    assert out["answer"] == "effusion, normal"
    assert Record.from_json(out, base_dir=tmp_path) == r


def test_label_with_comma_is_one_label(tmp_path):
    r = Record.from_json(
        obj(answer="atelectasis, lobar", labels=["atelectasis, lobar", "none"]), base_dir=tmp_path
    )
    assert r.answer == ("atelectasis, lobar",)


def test_answer_outside_label_set_message(tmp_path):
    with pytest.raises(DataError) as info:
        Record.from_json(obj(answer="pneumonia, fracture"), base_dir=tmp_path, where="manifest.jsonl")
    err = info.value
    assert (err.reason, err.field, err.path, err.line) == (
        "answer_not_in_labels",
        "answer",
        "manifest.jsonl",
        None,
    )
    assert str(err) == (
        "manifest.jsonl: field 'answer': 'fracture' is not in the label set "
        "['normal', 'pneumonia', 'effusion']"
    )


@pytest.mark.parametrize(
    ("over", "reason", "field"),
    [
        ({"answer": None}, "missing_field", "answer"),
        ({"labels": []}, "missing_field", "labels"),
        ({"labels": "normal"}, "bad_field", "labels"),
        ({"labels": ["a", "A"], "answer": "a"}, "bad_field", "labels"),
        ({"answer": 3}, "bad_field", "answer"),
        ({"answer": " , "}, "missing_field", "answer"),
        ({"id": True}, "bad_field", "id"),
        ({"domain": "cardiology"}, "bad_field", "domain"),
        ({"image": ["x.png"]}, "unknown_field", "image"),
        ({"images": ["a.png", "b.png"]}, "placeholder_mismatch", "problem"),
        ({"time_series": ["ecg/rec"]}, "placeholder_mismatch", "problem"),
        ({"images": "a.png"}, "bad_field", "images"),
        ({"bbox": [[1, 2, 3]]}, "bad_field", "bbox"),
        ({"bbox": [[5, 2, 3, 4]]}, "bad_field", "bbox"),
        ({"bbox": [[1, 2, 3, float("nan")]]}, "bad_field", "bbox"),
        ({"bbox": [[1, 2, 3, 4]], "images": [], "problem": "Which finding?"}, "bad_field", "bbox"),
        ({"origin": "simulated"}, "bad_field", "origin"),
        ({"source": ["x"]}, "bad_field", "source"),
    ],
)
def test_from_json_rejects(tmp_path, over, reason, field):
    with pytest.raises(DataError) as info:
        Record.from_json(obj(**over), base_dir=tmp_path, where="m.jsonl")
    assert (info.value.reason, info.value.field) == (reason, field)
    assert str(info.value).startswith(f"m.jsonl: field '{field}': ")


def test_validated_checks_records_built_in_code():
    bad = Record(id="x", problem="no placeholder", answer=("a",), labels=("a",), domain="ecg", dataset="d",
                 time_series=("/tmp/rec",))  # fmt: skip
    with pytest.raises(DataError, match="placeholder"):
        bad.validated()


def test_data_error_format_and_pickle():
    err = DataError("malformed_json", "invalid JSON", path="m.jsonl", line=12, field="answer")
    assert str(err) == "m.jsonl:12: field 'answer': invalid JSON"
    back = pickle.loads(pickle.dumps(err))
    assert (back.reason, back.path, back.line, back.field, str(back)) == (
        "malformed_json", "m.jsonl", 12, "answer", str(err),
    )  # fmt: skip
    assert str(DataError("x", "no location")) == "no location"
    assert isinstance(err, ValueError)


def test_skip_counter():
    counter = SkipCounter()
    assert counter.report() == "skipped 0 records"
    for reason in ("missing_file", "malformed_json", "missing_file"):
        counter.add(DataError(reason, "bad", path="m.jsonl", line=1))
    assert counter.as_dict() == {"missing_file": 2, "malformed_json": 1}
    assert counter.total == 3
    assert counter.report().splitlines()[:2] == [
        "skipped 3 record(s):",
        "  missing_file: 2 (first: m.jsonl:1: bad)",
    ]


def _write_files(folder: Path) -> None:
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "a.png").write_bytes(b"png")
    (folder / "ecg").mkdir()
    (folder / "ecg" / "rec.hea").write_text("rec 1 500 5000\n")


def test_write_then_read_manifest_moves_with_its_files(tmp_path):
    data = tmp_path / "data"
    _write_files(data)
    records = [
        Record.from_json(obj(), base_dir=data),
        Record.from_json(
            obj(id="r2", problem="<ecg> Rhythm?", images=[], time_series=["ecg/rec"], answer="normal"),
            base_dir=data,
        ),  # fmt: skip
    ]
    path = write_manifest(records, data / "manifest.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["images"] == ["img/a.png"] and lines[1]["time_series"] == ["ecg/rec"]
    assert set(lines[0]) == set(Record.__dataclass_fields__)
    moved = tmp_path / "elsewhere"
    shutil.copytree(data, moved)
    back = read_manifest(moved / "manifest.jsonl")
    assert [r.id for r in back] == ["r1", "r2"]
    assert back[0].images == (str(moved / "img" / "a.png"),)
    assert back[1].time_series == (str(moved / "ecg" / "rec"),)  # a WFDB stem counts as present


def test_read_manifest_rejects_duplicate_ids(tmp_path):
    path = tmp_path / "m.jsonl"
    line = json.dumps(obj(images=[], problem="Which finding?"))
    path.write_text(f"{line}\n\n{line}\n")
    with pytest.raises(DataError) as info:
        read_manifest(path)
    assert (info.value.reason, info.value.line) == ("duplicate_id", 3)


def test_import_climb_infers_domain_dataset_labels(tmp_path):
    def talk(question: str, answer: str) -> list[dict]:
        return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]

    entries = [
        {"images": ["chest_xray/toy/a.png"], "conversations": talk("Which finding?", "Pneumonia")},
        {"images": ["chest_xray/toy/b.png"], "conversations": talk("<image> Which finding?", "normal")},
        {"time-series": ["ecg/ptb/rec"], "dataset": "ptb", "conversations": talk("Rhythm?", "MI, CD")},
    ]
    path = tmp_path / "climb.json"
    path.write_text(json.dumps(entries))
    records = import_climb(path)
    assert [(r.domain, r.dataset) for r in records] == [("chest_xray", "toy")] * 2 + [("ecg", "ptb")]
    assert records[0].labels == ("normal", "Pneumonia") and records[0].answer == ("Pneumonia",)
    assert records[0].problem == "<image> Which finding?"  # the missing placeholder is prepended
    assert records[1].problem == "<image> Which finding?"
    assert records[2].problem == "<ecg> Rhythm?" and records[2].answer == ("MI", "CD")
    assert records[2].time_series == (str(tmp_path / "ecg" / "ptb" / "rec"),)
    assert [r.id for r in records] == ["climb-1", "climb-2", "climb-3"]


def test_import_climb_arguments_and_errors(tmp_path):
    path = tmp_path / "climb.jsonl"
    entry = {
        "images": ["x.png"],
        "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "Benign"}],
    }
    path.write_text(json.dumps(entry) + "\n")
    records = import_climb(
        path, domain="ultrasound", dataset="BUSI", labels=["normal", "benign", "malignant"]
    )
    assert records[0].answer == ("benign",) and records[0].labels == ("normal", "benign", "malignant")
    with pytest.raises(DataError) as info:
        import_climb(path)  # "x.png" names no domain folder
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 1, "domain")
    with pytest.raises(DataError) as info:
        import_climb(path, domain="ultrasound", dataset="BUSI", labels=["normal"])
    assert info.value.reason == "answer_not_in_labels" and info.value.line == 1
