"""Inputs of ``qoq predict``: unlabelled manifest lines, one file plus a question, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qoq.data.datamodules import MultiDomainDataModule
from qoq.data.errors import DataError
from qoq.data.predict import UNSPECIFIED, PredictInput, guess_kind, read_unlabelled


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "scan.png"
    Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(path)
    return path


def _manifest(folder: Path, *rows: dict) -> Path:
    path = folder / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_unlabelled_lines_need_only_the_question_and_files(tmp_path: Path, image: Path) -> None:
    path = _manifest(
        tmp_path,
        {"problem": "Which view?", "images": ["scan.png"]},  # no placeholder: one is put in front
        {"id": "b", "problem": "<image> Which?", "images": [str(image)], "labels": ["PA", "AP"], "domain": "chest_xray"},
        {"id": "c", "problem": "<image> Which?", "images": ["scan.png"], "labels": ["PA", "AP"], "answer": "AP",
         "domain": "chest_xray", "dataset": "mine"},
    )
    first, second, third = read_unlabelled(path)
    assert first.id == "new-1" and first.problem == "<image>\nWhich view?" and first.images == (str(image),)
    assert first.answer == () and first.labels == () and first.domain == UNSPECIFIED
    assert second.labels == ("PA", "AP") and second.answer == () and second.domain == "chest_xray"
    assert third.answer == ("AP",) and third.dataset == "mine"  # a full record: gold kept for the output


def test_unlabelled_errors_name_file_line_and_field(tmp_path: Path, image: Path) -> None:
    path = _manifest(tmp_path, {"problem": "<image> Which?", "images": ["scan.png"]},
                     {"problem": "<image> Which?", "images": ["missing.png"]})
    with pytest.raises(DataError) as err:
        read_unlabelled(path)
    message = str(err.value)
    assert f"{path}:2" in message and "images" in message and "missing.png" in message and "\n" not in message
    bad = _manifest(tmp_path, {"problem": "<image> <image> Which?", "images": ["scan.png"]})
    with pytest.raises(DataError, match="placeholder"):
        read_unlabelled(bad)
    with pytest.raises(DataError, match="field 'domain'"):
        read_unlabelled(_manifest(tmp_path, {"problem": "Which?", "images": ["scan.png"], "domain": "lungs"}))


def test_one_file_and_a_question(image: Path, tmp_path: Path) -> None:
    (record,) = PredictInput(file=str(image), question="Which view?", labels=["PA", "AP"]).records()
    assert record.id == "scan.png" and record.images == (str(image),) and record.problem.startswith("<image>")
    with pytest.raises(DataError, match=r"nope\.png: file not found"):
        PredictInput(file=str(tmp_path / "nope.png"), question="Which?").records()
    with pytest.raises(ValueError, match="question"):
        PredictInput(file=str(image)).records()


def test_guess_kind(dcm) -> None:
    assert guess_kind(dcm("waveform_ecg.dcm")) == "ecg"
    assert guess_kind(dcm("CT_small.dcm")) == "image"
    assert guess_kind(dcm("emri_small.dcm")) == "video"  # multi-frame


def test_predict_dataloader_reads_only_the_inputs(tmp_path: Path, image: Path) -> None:
    """No training records are read (none exist here); unspecified domains still collate."""
    path = _manifest(tmp_path, {"problem": "Which view?", "images": ["scan.png"]},
                     {"problem": "Which view?", "images": ["scan.png"], "domain": "ct"})
    dm = MultiDomainDataModule(predict=PredictInput(manifests=[str(path)]), image_size=4)
    dm.setup("predict")
    (batch,) = list(dm.predict_dataloader())
    assert batch.ids == ["new-1", "new-2"] and batch.domains == [UNSPECIFIED, "ct"]
    assert batch.targets[0].answer == () and batch.modalities["image"].values.shape == (2, 3, 4, 4)
