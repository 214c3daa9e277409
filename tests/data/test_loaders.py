"""Loaders and transforms on the real samples that pydicom, pydicom-data and nibabel ship."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pydicom
import pytest
import torch
from scipy.signal import resample_poly

from qoq.data.errors import DataError
from qoq.data.loaders import ECGSpec, frame_indices, read_ecg, read_frames, read_image, write_wfdb
from qoq.data.transforms import frames_to_tensor, load_mask, mask_box, resize_image, resize_mask, scale_boxes

LEADS_8 = [0, 1, 6, 7, 8, 9, 10, 11]  # I, II, V1-V6 among the 12 standard leads


def scaled(values: np.ndarray) -> np.ndarray:
    """Min/max to 0..255, rounding half up (the loaders' rule, written out for expectations)."""
    v = values.astype(np.float64)
    return np.floor((v - v.min()) / (v.max() - v.min()) * 255 + 0.5)


# ---------------------------------------------------------------------------------------- DICOM images


@pytest.mark.parametrize(
    ("name", "shape"),
    [("CT_small.dcm", (128, 128)), ("MR_small.dcm", (64, 64)), ("US1_UNCR.dcm", (480, 640)),
     ("RG3_UNCR.dcm", (1760, 1760)), ("JPEG2000.dcm", (1024, 256))],
)  # fmt: skip
def test_read_image_dicom_modalities(dcm, name, shape):
    img = read_image(dcm(name))
    assert img.shape == (*shape, 3) and img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255


def test_ct_modality_lut_then_minmax(dcm):
    ds = pydicom.dcmread(dcm("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)  # no window in this file
    img = read_image(dcm("CT_small.dcm"))
    assert np.array_equal(img[..., 0], scaled(hu))
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])


def test_mr_voi_window_saturates(dcm):
    ds = pydicom.dcmread(dcm("MR_small.dcm"))
    raw = ds.pixel_array
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)  # linear below 1399
    img = read_image(dcm("MR_small.dcm"))[..., 0]
    assert (img[raw >= 1399] == 255).all() and (raw >= 1399).sum() > 200  # saturated by the window
    assert (img[raw <= 1390] < 255).all()  # without it only the brightest pixel (2145) would reach 255


def test_monochrome1_is_inverted(dcm):
    path = dcm("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (15000.0, 30000.0)  # covers 874..26479: linear
    img = read_image(path)[..., 0].astype(int)
    expected = 255 - scaled(ds.pixel_array)
    assert np.abs(img - expected).max() <= 1


def test_palette_colour_applied(dcm):
    from pydicom.pixels import apply_color_lut

    ds = pydicom.dcmread(dcm("examples_palette.dcm"))
    rgb16 = apply_color_lut(ds.pixel_array, ds)
    assert (rgb16.min(), rgb16.max()) == (0, 65280)
    img = read_image(dcm("examples_palette.dcm"))
    assert np.array_equal(img, np.floor(rgb16 * (255 / 65280) + 0.5))
    assert (img[..., 0] != img[..., 2]).mean() > 0.05  # really colour


def test_ybr_converted_once(dcm):
    rgb = read_image(dcm("SC_rgb.dcm")).astype(int)
    ybr = read_image(dcm("SC_ybr_full_uncompressed.dcm")).astype(int)
    assert pydicom.dcmread(dcm("SC_ybr_full_uncompressed.dcm")).PhotometricInterpretation == "YBR_FULL"
    assert np.abs(rgb - ybr).max() <= 8  # twice converted would be off by > 100
    assert rgb[0, 0].tolist() == [255, 0, 0]


def test_multiframe_cine_frames(dcm):
    path = dcm("examples_ybr_color.dcm")
    first, last = read_image(path), read_image(path, frame=29)
    assert first.shape == (240, 320, 3) and not np.array_equal(first, last)
    frames = read_frames(path, 4)
    assert frames.shape == (4, 240, 320, 3)
    assert np.array_equal(frames[0], first) and np.array_equal(frames[3], last)  # 8-bit colour: no rescale
    assert np.array_equal(frames[1], read_image(path, frame=10))
    with pytest.raises(DataError) as info:
        read_image(path, frame=30)
    assert info.value.reason == "bad_frame" and info.value.path == str(path)


def test_frame_indices():
    assert frame_indices(30, 4).tolist() == [0, 10, 19, 29]
    assert frame_indices(3, 5).tolist() == [0, 1, 1, 2, 2]  # fewer frames than asked: repeats
    assert frame_indices(10, 1).tolist() == [4]
    assert frame_indices(1, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        frame_indices(0, 2)


def test_png_jpeg_and_16bit(tmp_path):
    from PIL import Image

    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray).save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.shape == (3, 4, 3) and np.array_equal(img[..., 1], gray)
    with pytest.raises(DataError) as info:
        read_image(tmp_path / "g.png", frame=1)
    assert info.value.reason == "bad_frame"
    Image.fromarray(np.array([[1000, 3000]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 255]
    Image.new("RGB", (5, 4), (10, 200, 30)).save(tmp_path / "c.jpg")
    assert np.abs(read_image(tmp_path / "c.jpg").astype(int) - [10, 200, 30]).max() <= 3


# ---------------------------------------------------------------------------------------- volumes


def test_nifti_slices_canonical_orientation(nii):
    frames = read_frames(nii("standard.nii.gz"), 7)  # (4, 5, 7) uint8 0/255, RAS
    assert frames.shape == (7, 5, 4, 3)
    expected_first = [[0, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 0], [255, 0, 0, 255], [0, 255, 0, 0]]
    assert frames[0, ..., 0].tolist() == expected_first  # anterior (high y) on top


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("example4d.nii.gz", (6, 96, 128, 3)),
        ("anatomical.nii", (6, 41, 33, 3)),
        ("example_nifti2.nii.gz", (6, 20, 32, 3)),
    ],
)
def test_nifti_volumes(nii, name, shape):
    frames = read_frames(nii(name), 6)
    assert frames.shape == shape and frames.max() == 255


def _series(tmp_path, ct_copy, values, positions, numbers):
    folder = tmp_path / "series"
    folder.mkdir()
    for i, (value, z, n) in enumerate(zip(values, positions, numbers, strict=True)):
        ds = pydicom.dcmread(ct_copy)
        ds.PixelData = np.full((128, 128), value, dtype=np.int16).tobytes()
        ds.InstanceNumber = n
        if z is None:
            del ds.ImagePositionPatient
        else:
            ds.ImagePositionPatient = [0, 0, z]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(folder / f"slice{i}")  # no suffix: recognised by the DICM marker
    return folder


def test_dicom_series_sorted_by_position(tmp_path, ct_copy):
    folder = _series(tmp_path, ct_copy, [100, 200, 300], [10.0, -5.0, 0.0], [1, 2, 3])
    frames = read_frames(folder, 3)
    assert frames[:, 0, 0, 0].tolist() == [128, 255, 0]  # z = -5, 0, 10 -> 200, 300, 100 -> scaled jointly


def test_dicom_series_falls_back_to_instance_number(tmp_path, ct_copy):
    folder = _series(tmp_path, ct_copy, [100, 200, 300], [None] * 3, [3, 1, 2])
    assert read_frames(folder, 3)[:, 0, 0, 0].tolist() == [128, 255, 0]  # instance 1, 2, 3


def test_real_ct_series(dcm):
    folder = dcm("CT_small.dcm").parent / "dicomdirtests" / "98892001" / "CT5N"
    frames = read_frames(folder, 5)
    assert frames.shape == (5, 16, 16, 3)
    assert len({frames[i].tobytes() for i in range(5)}) == 5


def test_single_image_as_video_repeats(dcm):
    frames = read_frames(dcm("CT_small.dcm"), 3)
    assert frames.shape == (3, 128, 128, 3) and np.array_equal(frames[0], frames[2])


# ---------------------------------------------------------------------------------------- ECG


def test_dicom_ecg_uv_to_mv_and_resampling(dcm, dicom_ecg):
    signal_mV, rate = dicom_ecg
    assert signal_mV.shape == (12, 10000) and rate == 1000.0
    out = read_ecg(dcm("waveform_ecg.dcm"), ECGSpec.qoq_med_released())
    assert out.shape == (8, 2500) and out.dtype == np.float32
    expected = resample_poly(signal_mV[LEADS_8], 1, 2, axis=1)[:, :2500]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert 0.5 < np.abs(out).max() < 5.0  # mV, not uV (raw values reach 1962.5 uV)
    at250 = read_ecg(dcm("waveform_ecg.dcm"), ECGSpec())
    assert at250.shape == (8, 2500)  # 10 s at 250 Hz
    raw_peak = np.abs(signal_mV[LEADS_8]).max()
    assert abs(np.abs(at250).max() - raw_peak) < 0.15 * raw_peak  # resampling keeps the amplitude


def test_wfdb_round_trip_and_stem(tmp_path, dicom_ecg):
    signal_mV, _ = dicom_ecg
    leads = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    header = write_wfdb(signal_mV, leads, 1000, tmp_path / "rec" / "ecg_1")
    assert header == tmp_path / "rec" / "ecg_1.hea"
    spec = ECGSpec(leads=("V6", "I"), sample_rate=1000, seconds=10.0)
    out = read_ecg(header, spec)
    np.testing.assert_allclose(out, signal_mV[[11, 0]], atol=2e-3)  # 16-bit quantisation
    np.testing.assert_array_equal(read_ecg(tmp_path / "rec" / "ecg_1", spec), out)


def test_npy_and_pt_with_sidecar(tmp_path, dicom_ecg):
    signal_mV, _ = dicom_ecg
    names = ["Lead I (Einthoven)", "Lead II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    np.save(tmp_path / "e.npy", signal_mV * 1000)
    (tmp_path / "e.json").write_text(json.dumps({"sample_rate": 1000, "leads": names, "units": "uV"}))
    torch.save(torch.from_numpy(signal_mV), tmp_path / "p.pt")
    spec = ECGSpec.qoq_med_released()
    expected = resample_poly(signal_mV[LEADS_8], 1, 2, axis=1)[:, :2500]
    np.testing.assert_allclose(read_ecg(tmp_path / "e.npy", spec), expected, atol=1e-5)
    pt = read_ecg(tmp_path / "p.pt", spec, sample_rate=1000, leads=[n.upper() for n in names])
    np.testing.assert_allclose(pt, expected, atol=1e-5)


def test_npy_without_metadata_assumes_spec(tmp_path):
    x = np.random.default_rng(0).normal(size=(8, 2600)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(read_ecg(tmp_path / "x.npy"), x[:, :2500])  # cropped to its start


# ---------------------------------------------------------------------------------------- transforms


def test_resize_image_and_boxes_stay_aligned():
    img = np.zeros((40, 80, 3), dtype=np.uint8)
    img[10:20, 40:60] = 255  # box x 40..60, y 10..20 in pixel-edge coordinates
    tensor, scale = resize_image(img, 20)
    assert tensor.shape == (3, 20, 20) and tensor.dtype == torch.float32
    assert 0.0 <= tensor.min() and tensor.max() <= 1.0
    assert scale == (0.25, 0.5)
    box = scale_boxes([[40, 10, 60, 20]], scale)
    assert box.tolist() == [[10.0, 5.0, 15.0, 10.0]]
    # the bright mass keeps its area (200 px * 400 / 3200 = 25 = 5 x 5) and its centre (12.5, 7.5)
    weight = tensor[0].double()
    assert weight.sum().item() == pytest.approx(25.0, rel=1e-3)
    ys, xs = torch.meshgrid(torch.arange(20) + 0.5, torch.arange(20) + 0.5, indexing="ij")
    centre = ((weight * xs).sum() / weight.sum(), (weight * ys).sum() / weight.sum())
    assert (centre[0].item(), centre[1].item()) == (
        pytest.approx(12.5, abs=1e-3),
        pytest.approx(7.5, abs=1e-3),
    )
    assert tensor[0, 6:9, 11:14].min() > 0.99
    assert scale_boxes(np.zeros((0, 4)), scale).shape == (0, 4)


def test_resize_mask_nearest():
    mask = np.zeros((4, 8), dtype=bool)
    mask[0:2, 4:8] = True
    out = resize_mask(mask, 4)
    assert out.dtype == torch.bool
    assert out.int().tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_frames_to_tensor():
    frames = np.full((3, 10, 6, 3), 255, dtype=np.uint8)
    out = frames_to_tensor(frames, 8)
    assert out.shape == (3, 3, 8, 8) and torch.allclose(out, torch.ones_like(out))
    with pytest.raises(ValueError):
        frames_to_tensor(frames[0], 8)


def test_load_mask_and_box(tmp_path):
    from PIL import Image

    m = np.zeros((6, 9), dtype=np.uint8)
    m[1:3, 2:7] = 1  # 0/1 masks are common: any non-zero pixel is foreground
    Image.fromarray(m).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.sum() == 10
    assert mask_box(mask) == (2.0, 1.0, 7.0, 3.0)
    assert mask_box(np.zeros((3, 3), dtype=bool)) is None
    np.save(tmp_path / "m.npy", m * 3)
    assert np.array_equal(load_mask(tmp_path / "m.npy"), mask)


def test_copied_sample_outside_package(tmp_path, dcm):
    dst = tmp_path / "scan.bin"  # no .dcm suffix: the DICM marker decides
    shutil.copy(dcm("MR_small.dcm"), dst)
    assert np.array_equal(read_image(dst), read_image(dcm("MR_small.dcm")))
