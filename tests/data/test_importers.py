"""Importers on tiny layouts with the real column names, and the DICOM ECG through the PTB-XL path."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.signal import resample_poly

from qoq.data.domains import CHEXPERT_LABELS, ECG_LABELS, SKIN_LESIONS
from qoq.data.errors import DataError, SkipCounter
from qoq.data.importers import (
    IMPORTERS,
    import_busi,
    import_chexpert,
    import_dataset,
    import_ham10000,
    import_ptbxl,
    label_counts,
)
from qoq.data.loaders import ECGSpec, read_ecg, read_image
from qoq.data.manifest import read_manifest
from qoq.data.transforms import load_mask

LEADS_8 = [0, 1, 6, 7, 8, 9, 10, 11]


def test_ptbxl_labels_splits_and_paths(ptbxl_root):
    records = import_ptbxl(ptbxl_root)
    assert [r.id for r in records] == ["ptbxl-1", "ptbxl-2", "ptbxl-3"]
    assert [r.answer for r in records] == [("normal",), ("MI", "AFib", "HYP"), ("other",)]
    assert all(r.labels == ECG_LABELS and r.domain == "ecg" and r.dataset == "PTB-XL" for r in records)
    assert [r.source["split"] for r in records] == ["train", "val", "test"]
    assert records[0].time_series == (str(ptbxl_root / "records500" / "00000" / "00001_hr"),)
    assert records[0].problem.startswith("<ecg>\n")
    # likelihood 0 codes (LVH of record 2) drop out with a threshold
    assert import_ptbxl(ptbxl_root, min_likelihood=10)[1].answer == ("MI", "AFib")
    assert import_ptbxl(ptbxl_root, sampling_rate=100)[0].time_series[0].endswith("00001_lr")


def test_dicom_ecg_through_ptbxl_path(ptbxl_root, dcm, dicom_ecg, tmp_path):
    """DICOM ECG -> WFDB (fixture) -> PTB-XL importer -> manifest -> read_ecg, against the DICOM itself."""
    out = tmp_path / "manifests" / "ptbxl.jsonl"
    import_dataset("ptbxl", ptbxl_root, out)
    record = read_manifest(out, check_files="load", ecg_spec=ECGSpec.qoq_med_released())[0]
    spec = ECGSpec.qoq_med_released()
    via_wfdb = read_ecg(record.time_series[0], spec)
    direct = read_ecg(dcm("waveform_ecg.dcm"), spec)
    assert via_wfdb.shape == direct.shape == (8, 2500)
    np.testing.assert_allclose(via_wfdb, direct, atol=2e-3)  # WFDB 16-bit quantisation only
    signal_mV, _ = dicom_ecg
    np.testing.assert_allclose(direct, resample_poly(signal_mV[LEADS_8], 1, 2, axis=1)[:, :2500], atol=1e-5)
    # 100 Hz records go up to 250 Hz (10 s -> 2500 samples)
    low = import_ptbxl(ptbxl_root, sampling_rate=100)[0]
    assert read_ecg(low.time_series[0], ECGSpec()).shape == (8, 2500)


def test_busi_masks_boxes_and_union(busi_root, tmp_path):
    records = {r.id: r for r in import_busi(busi_root, mask_dir=tmp_path / "masks")}
    assert sorted(records) == ["busi-benign-benign-1", "busi-benign-benign-2", "busi-malignant-malignant-1",
                               "busi-normal-normal-1"]  # fmt: skip
    one = records["busi-benign-benign-1"]
    assert one.answer == ("benign",) and one.domain == "ultrasound" and one.dataset == "BUSI"
    assert one.bbox == ((10.0, 5.0, 20.0, 10.0),)
    assert one.segmentation_path.endswith("benign (1)_mask.png")
    two = records["busi-benign-benign-2"]
    assert two.bbox == ((0.0, 0.0, 4.0, 4.0), (30.0, 20.0, 40.0, 30.0))
    union = load_mask(two.segmentation_path)
    assert union.sum() == 16 + 100 and union[0, 0] and union[25, 35]
    normal = records["busi-normal-normal-1"]
    assert normal.bbox == () and normal.segmentation_path is None
    assert read_image(records["busi-malignant-malignant-1"].images[0]).shape == (32, 48, 3)
    # without mask_dir: first mask kept, the rest counted
    plain = {r.id: r for r in import_busi(busi_root / "Dataset_BUSI_with_GT")}
    assert plain["busi-benign-benign-2"].source["extra_masks"] == 1


def test_ham10000_mapping(ham_root):
    records = import_ham10000(ham_root)
    assert [r.answer[0] for r in records] == [
        "other",
        "other",
        "melanoma",
        "nevus",
        "BCC",
        "AKIEC",
        "other",
        "other",
    ]
    assert all(r.labels == SKIN_LESIONS for r in records)
    assert records[3].label_source == "follow-up" and records[0].source["dx"] == "bkl"
    assert records[0].source["split"] == records[1].source["split"]  # one lesion, one split
    assert records[1].images[0].endswith("HAM10000_images_part_2/ISIC_0025030.jpg")
    assert all("HAM_" not in json.dumps(r.to_json()) for r in records)  # lesion ids stay out


@pytest.mark.parametrize(
    ("policy", "answers"),
    [
        ("negative", [("No Finding", "Support Devices"), ("Edema",), ("No Finding",), ("No Finding",)]),
        (
            "positive",
            [("No Finding", "Support Devices"), ("Cardiomegaly", "Edema"), ("Atelectasis",), ("No Finding",)],
        ),
        ("skip", [("No Finding", "Support Devices"), ("No Finding",)]),
    ],
)
def test_chexpert_uncertainty_policies(chexpert_root, policy, answers):
    counter = SkipCounter()
    records = import_chexpert(chexpert_root, uncertain=policy, counter=counter)
    assert [r.answer for r in records] == answers
    assert all(r.labels == CHEXPERT_LABELS for r in records)
    assert counter.as_dict() == ({"uncertain_label": 2} if policy == "skip" else {})
    assert records[-1].source["split"] == "valid"
    assert records[0].images[0] == str(
        chexpert_root / "train" / "patient00001" / "study1" / "view1_frontal.jpg"
    )
    assert "(frontal, AP)" in records[0].problem


def test_chexpert_frontal_only_and_no_demographics(chexpert_root):
    records = import_chexpert(chexpert_root, frontal_only=True)
    assert len(records) == 3 and all(r.source["view"] == "frontal" for r in records)
    text = json.dumps([r.to_json() for r in records])
    assert "Female" not in text and '"68"' not in text
    assert [r.id for r in records] == [
        "chexpert-train-000001",
        "chexpert-train-000002",
        "chexpert-valid-000001",
    ]


def test_import_dataset_writes_manifest_and_counts(busi_root, tmp_path):
    out = tmp_path / "out" / "busi.jsonl"
    records = import_dataset("busi", busi_root, out)
    back = read_manifest(out, check_files="load")
    assert back == records
    assert (tmp_path / "out" / "busi_masks").is_dir()  # the union mask of the two-mask image
    assert (
        "Dataset_BUSI_with_GT" in out.read_text() and str(tmp_path) not in out.read_text()
    )  # relative paths
    table = label_counts(records).splitlines()
    assert table[0].split() == ["domain", "dataset", "label", "count"]
    assert table[1:4] == [
        "ultrasound  BUSI     normal     1",
        "ultrasound  BUSI     benign     2",
        "ultrasound  BUSI     malignant  1",
    ]
    assert table[4].endswith("4 (4 real, 0 synthetic)")
    with pytest.raises(ValueError, match="unknown dataset kind"):
        import_dataset("mimic", busi_root, out)
    assert set(IMPORTERS) == {"ptbxl", "busi", "ham10000", "chexpert", "climb"}


def test_importer_errors_name_table_line_and_column(ham_root, chexpert_root, ptbxl_root):
    table = ham_root / "HAM10000_metadata.csv"
    table.write_text(table.read_text().replace("ISIC_0026769,mel", "ISIC_0026769,melanoma"))
    with pytest.raises(DataError) as info:
        import_ham10000(ham_root)
    assert (info.value.path, info.value.line, info.value.field) == (str(table), 4, "dx")
    counter = SkipCounter()
    assert len(import_ham10000(ham_root, skip_invalid=True, counter=counter)) == 7
    assert counter.as_dict() == {"bad_field": 1}

    train = chexpert_root / "train.csv"
    train.write_text(train.read_text().replace("-1.0", "maybe", 1))
    with pytest.raises(DataError) as info:
        import_chexpert(chexpert_root)
    assert (info.value.path, info.value.line, info.value.field) == (str(train), 3, "Cardiomegaly")

    (ptbxl_root / "records500" / "00000" / "00002_hr.hea").unlink()
    with pytest.raises(DataError) as info:
        import_ptbxl(ptbxl_root)
    err = info.value
    assert (err.reason, err.line, err.field) == ("missing_file", 3, "filename_hr")
    assert err.path == str(ptbxl_root / "ptbxl_database.csv")
