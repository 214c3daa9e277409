"""PHI: identifying values planted in real DICOM headers never reach outputs, logs or records."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest

from qoq.data import loaders
from qoq.data.importers import import_dataset
from qoq.data.loaders import ECGSpec, read_ecg, read_frames, read_image, write_wfdb
from qoq.data.manifest import read_manifest, write_manifest
from qoq.data.phi import PHI_TAGS, assert_no_phi, phi_values
from qoq.data.records import Record


def test_loader_tag_lists_exclude_phi():
    read = set(loaders.DICOM_PIXEL_TAGS) | set(loaders.DICOM_SERIES_TAGS) | set(loaders.DICOM_WAVEFORM_TAGS)
    assert not read & set(PHI_TAGS)
    assert {"PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "AccessionNumber"} <= set(
        PHI_TAGS
    )


def test_assert_no_phi_can_fail(tmp_path, planted, dcm):
    values, plant = planted
    dicom = plant(dcm("CT_small.dcm"), tmp_path / "in" / "ct.dcm")
    ds = pydicom.dcmread(dicom)
    assert set(values.values()) <= set(phi_values(ds))
    with pytest.raises(AssertionError, match="identifying value .* found in file"):
        assert_no_phi([dicom], ds)  # the planted input itself holds them
    with pytest.raises(AssertionError, match="Jane Doe"):
        assert_no_phi(["report for Jane Doe"], values.values())  # name parts in another order
    assert_no_phi(["nothing here", tmp_path / "in"], ["absent-value"])
    with pytest.raises(ValueError):
        assert_no_phi(["x"], [])


def test_pydicom_debug_log_shows_values_it_reads(tmp_path, planted, dcm, caplog):
    """The control for the scan below: a full header read does log the planted name."""
    values, plant = planted
    ct = plant(dcm("CT_small.dcm"), tmp_path / "ct.dcm")
    caplog.set_level(logging.DEBUG)
    pydicom.config.debug(True)
    try:
        pydicom.dcmread(ct)
    finally:
        pydicom.config.debug(False)
    with pytest.raises(AssertionError):
        assert_no_phi([caplog.text], values.values())


def test_planted_phi_never_leaves_the_pipeline(tmp_path, planted, dcm, ptbxl_root, caplog, capsys):
    values, plant = planted
    inputs, outputs = tmp_path / "inputs", tmp_path / "outputs"
    ct = plant(dcm("CT_small.dcm"), inputs / "ct.dcm")
    mr = plant(dcm("MR_small.dcm"), inputs / "mr.dcm")
    cine = plant(dcm("examples_ybr_color.dcm"), inputs / "cine.dcm")
    ecg = plant(dcm("waveform_ecg.dcm"), inputs / "ecg.dcm")
    for i in range(3):
        plant(dcm("CT_small.dcm"), inputs / "series" / f"s{i}.dcm")
    leads = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6", "III", "aVR", "aVL", "aVF")
    pydicom.config.debug(True)  # pydicom then logs every element it parses: unread tags show no value
    caplog.set_level(logging.DEBUG)
    try:
        arrays = [read_image(ct), read_image(mr), read_frames(cine, 3), read_frames(inputs / "series", 2)]
        signal = read_ecg(ecg, ECGSpec(leads=leads, sample_rate=500))
    finally:
        pydicom.config.debug(False)
    assert "Reading file" in caplog.text  # the debug log was captured
    assert all(a.dtype == np.uint8 for a in arrays) and signal.shape == (12, 5000)

    # convert the ECG to WFDB and import it the PTB-XL way (patient_id planted in the table too)
    write_wfdb(signal, leads, 500, outputs / "wfdb" / "ecg_1")
    (ptbxl_root / "ptbxl_database.csv").write_text(
        (ptbxl_root / "ptbxl_database.csv").read_text().replace("PHI-123456", values["PatientID"])
    )
    records = import_dataset("ptbxl", ptbxl_root, outputs / "ptbxl.jsonl")
    image_record = Record(id="ct-1", problem="<image> Region?", answer=("head",), labels=("head", "chest"),
                          domain="ct", dataset="planted", images=(str(ct),), videos=(),
                          label_source="dicom header")  # fmt: skip
    write_manifest([image_record, *records], outputs / "all.jsonl")
    back = read_manifest(outputs / "all.jsonl", check_files="load")

    captured = capsys.readouterr()
    assert_no_phi(
        [outputs, caplog.text, captured.out, captured.err, repr(back), repr(records)],
        list(values.values()) + ["Doe^Jane"],
    )
    assert any(Path(p).is_file() for p in outputs.rglob("*"))  # the scan covered real files
