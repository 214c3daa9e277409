"""Modality loaders: images, frame stacks (cines, 3-D volumes) and ECGs, as plain arrays.

Loaders return pixels or signal values and nothing else: DICOM files are parsed for the tags listed in
:data:`DICOM_PIXEL_TAGS`, :data:`DICOM_SERIES_TAGS` and :data:`DICOM_WAVEFORM_TAGS` only, so patient
identifiers in a header are never even read (see :mod:`qoq.data.phi`). Any input a loader cannot use
raises :class:`~qoq.data.errors.DataError` naming the file; nothing is padded or blanked silently.

Intensity rule for every image-like output: DICOM modality LUT, then VOI LUT (window), then
MONOCHROME1 inverted, palette colour applied; then the values are scaled to uint8 by their min/max
(over all returned frames jointly, so a volume keeps one contrast), and grayscale is replicated to
three channels. Colour data that is already 8-bit is kept as is.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from qoq.data.errors import DataError

#: DICOM attributes read to decode pixels (and nothing else).
DICOM_PIXEL_TAGS: tuple[str, ...] = (
    "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration", "NumberOfFrames",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "PixelData", "FloatPixelData", "DoubleFloatPixelData",
    "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "AlphaPaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData", "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "AlphaPaletteColorLookupTableData", "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData", "SegmentedBluePaletteColorLookupTableData",
    "SegmentedAlphaPaletteColorLookupTableData",
)  # fmt: skip

#: DICOM attributes read to order the slices of a series.
DICOM_SERIES_TAGS: tuple[str, ...] = ("InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient")

#: DICOM attributes read for a waveform (ECG).
DICOM_WAVEFORM_TAGS: tuple[str, ...] = ("WaveformSequence",)

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_MV_PER_UNIT = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "v": 1e3}


# --------------------------------------------------------------------------------------------- images


def read_image(path: str | os.PathLike[str], *, frame: int | None = None) -> np.ndarray:
    """Read one image as RGB uint8.

    PNG / JPEG (any format Pillow reads), ``.npy`` arrays (``[H, W]`` or ``[H, W, 3]``) and DICOM
    (recognised by its ``DICM`` preamble or a ``.dcm`` suffix). Multi-frame files give their first
    frame unless ``frame`` is given.

    Args:
        path: the image file.
        frame: 0-based frame of a multi-frame file, or None for the first.

    Returns:
        ``[H, W, 3]`` uint8.

    Raises:
        DataError: ``"missing_file"``, ``"unreadable_file"``, ``"corrupt_dicom"``, ``"bad_frame"``.
    """
    path = _existing(path)
    if path.is_dir():
        raise DataError("unreadable_file", "is a folder, not an image (read_frames reads series)", path=path)
    if is_dicom(path):
        values, mono1 = _dicom_values(path, frame=0 if frame is None else frame)
        return _to_rgb8(values, invert=mono1)[0]
    if path.suffix.lower() == ".npy":
        return _to_rgb8(_load_npy(path, ndims=(2, 3))[None])[0]
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        raise DataError("unsupported_format", "a NIfTI volume is a video item: use read_frames", path=path)
    return _read_pil(path, frame or 0)


def is_dicom(path: str | os.PathLike[str]) -> bool:
    """Whether a file is DICOM: a ``.dcm`` / ``.dicom`` suffix or the ``DICM`` marker at byte 128."""
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _existing(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError("missing_file", "file not found", path=path)
    return path


def _read_pil(path: Path, frame: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if frame:
                if frame >= getattr(img, "n_frames", 1):
                    raise DataError("bad_frame", f"frame {frame} of {getattr(img, 'n_frames', 1)}", path=path)
                img.seek(frame)
            img.load()
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                return _to_rgb8(np.asarray(img, dtype=np.float64)[None])[0]
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(
            "unreadable_file", f"cannot decode image ({err.__class__.__name__}: {err})", path=path
        ) from None


def _load_npy(path: Path, ndims: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError("unreadable_file", f"cannot read array ({err})", path=path) from None
    if arr.ndim not in ndims or (arr.ndim == 3 and arr.shape[-1] != 3):
        raise DataError("bad_shape", f"array of shape {list(arr.shape)} is not an image", path=path)
    return arr


def _read_dicom(path: Path, tags: tuple[str, ...], *, pixels: bool = True):
    import pydicom

    try:
        return pydicom.dcmread(path, specific_tags=list(tags), stop_before_pixels=not pixels)
    except Exception as err:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error, ...)
        raise DataError(
            "corrupt_dicom", f"cannot parse DICOM ({err.__class__.__name__})", path=path
        ) from None


def _dicom_values(path: Path, frame: int | None = None) -> tuple[np.ndarray, bool]:
    """Display values of a DICOM image after its LUTs: ``[F, H, W]`` or ``[F, H, W, 3]``, and MONOCHROME1."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    ds = _read_dicom(path, DICOM_PIXEL_TAGS)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError("corrupt_dicom", "no pixel data", path=path)
    try:
        arr = ds.pixel_array  # pydicom 3 converts YBR to RGB here (once)
    except Exception as err:
        raise DataError(
            "corrupt_dicom", f"cannot decode pixels ({err.__class__.__name__}: {err})", path=path
        ) from None
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames == 1:
        arr = arr[None]
    if frame is not None:
        if not 0 <= frame < n_frames:
            raise DataError("bad_frame", f"frame {frame} of {n_frames}", path=path)
        arr = arr[frame : frame + 1]
    photometric = str(ds.get("PhotometricInterpretation", ""))
    try:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        elif int(ds.get("SamplesPerPixel", 1)) == 1:
            arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    except Exception as err:
        raise DataError(
            "corrupt_dicom", f"cannot apply LUT ({err.__class__.__name__}: {err})", path=path
        ) from None
    return arr, photometric == "MONOCHROME1"


def _to_rgb8(values: np.ndarray, *, invert: bool = False) -> np.ndarray:
    """``[F, H, W]`` or ``[F, H, W, 3]`` values -> ``[F, H, W, 3]`` uint8 (joint min/max over all frames)."""
    if values.dtype != np.uint8 or invert:
        v = np.nan_to_num(values.astype(np.float64))
        lo, hi = float(v.min()), float(v.max())
        v = (v - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(v)
        values = np.clip(np.floor(v + 0.5), 0, 255).astype(np.uint8)
        if invert:
            values = 255 - values
    if values.ndim == 3:
        values = np.repeat(values[..., None], 3, axis=-1)
    return values


# --------------------------------------------------------------------------------------------- frames


def frame_indices(total: int, num_frames: int) -> np.ndarray:
    """Evenly spaced frame indices, first and last included: ``round(i * (total - 1) / (num_frames - 1))``.

    With fewer frames than asked (``total < num_frames``) frames repeat, each as close as possible to
    its even position; ``num_frames == 1`` picks the middle frame.

    Args:
        total: frames available (>= 1).
        num_frames: frames wanted (>= 1).

    Returns:
        ``[num_frames]`` int64 indices in ``[0, total)``.
    """
    if total < 1 or num_frames < 1:
        raise ValueError(f"need total >= 1 and num_frames >= 1, got {total}, {num_frames}")
    if num_frames == 1:
        return np.array([(total - 1) // 2], dtype=np.int64)
    return np.floor(np.linspace(0, total - 1, num_frames) + 0.5).astype(np.int64)


def read_frames(path: str | os.PathLike[str], num_frames: int) -> np.ndarray:
    """Read a cine or a 3-D volume as ``num_frames`` evenly sampled RGB frames.

    - NIfTI (``.nii`` / ``.nii.gz``): reoriented to the closest canonical (RAS+) axes, then slices
      along the last spatial axis (axial, inferior to superior); a 4-D image gives its first volume.
      Each slice is shown with anterior at the top and the patient's right on the right.
    - DICOM multi-frame (cine): its frames in order.
    - a folder of DICOM slices (one series): ordered by position along the slice normal
      (ImagePositionPatient . normal of ImageOrientationPatient), else by InstanceNumber, else by
      file name; only the sampled slices are decoded.
    - any single image: that image, repeated.

    Sampling follows :func:`frame_indices`: frames repeat when the source has fewer than asked.

    Args:
        path: the file or series folder.
        num_frames: frames to return.

    Returns:
        ``[num_frames, H, W, 3]`` uint8, scaled jointly over the returned frames.

    Raises:
        DataError: ``"missing_file"``, ``"corrupt_dicom"``, ``"empty_series"``, ``"bad_shape"``, ...
    """
    path = _existing(path)
    if path.is_dir():
        return _read_series(path, num_frames)
    if path.name.lower().endswith(_NIFTI_SUFFIXES):
        return _read_nifti(path, num_frames)
    if is_dicom(path):
        values, mono1 = _dicom_values(path)
        return _to_rgb8(values[frame_indices(len(values), num_frames)], invert=mono1)
    image = read_image(path)
    return np.repeat(image[None], num_frames, axis=0)


def _read_nifti(path: Path, num_frames: int) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        shape = img.shape
    except Exception as err:
        raise DataError(
            "unreadable_file", f"cannot read NIfTI ({err.__class__.__name__}: {err})", path=path
        ) from None
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise DataError("bad_shape", f"NIfTI of shape {list(shape)} is not a volume", path=path)
    rest = (0,) * (len(shape) - 3)  # first volume of a 4-D (or higher) image
    slices = [
        np.asarray(img.dataobj[(slice(None), slice(None), int(z), *rest)])
        for z in frame_indices(shape[2], num_frames)
    ]
    values = np.stack([np.rot90(s) for s in slices])  # [F, Y, X]: anterior at the top
    return _to_rgb8(values)


def _read_series(folder: Path, num_frames: int) -> np.ndarray:
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != "DICOMDIR" and is_dicom(p)]
    if not files:
        raise DataError("empty_series", "folder holds no DICOM files", path=folder)
    files = _order_series(files)
    chosen = [files[i] for i in frame_indices(len(files), num_frames)]
    decoded = {p: _dicom_values(p, frame=0) for p in dict.fromkeys(chosen)}
    shapes = {v.shape for v, _ in decoded.values()}
    if len(shapes) != 1:
        raise DataError("bad_shape", f"slices differ in size: {sorted(shapes)}", path=folder)
    values = np.concatenate([decoded[p][0] for p in chosen])
    return _to_rgb8(values, invert=decoded[chosen[0]][1])


def _order_series(files: list[Path]) -> list[Path]:
    heads = [_read_dicom(p, DICOM_SERIES_TAGS, pixels=False) for p in files]
    if all("ImagePositionPatient" in h and "ImageOrientationPatient" in h for h in heads):

        def position(h) -> float:
            iop = np.asarray(h.ImageOrientationPatient, dtype=np.float64)
            return float(
                np.dot(np.asarray(h.ImagePositionPatient, dtype=np.float64), np.cross(iop[:3], iop[3:]))
            )

        keys = [position(h) for h in heads]
    elif all(h.get("InstanceNumber") is not None for h in heads):
        keys = [int(h.InstanceNumber) for h in heads]
    else:
        return files
    return [p for _, _, p in sorted(zip(keys, range(len(files)), files, strict=True))]


# ------------------------------------------------------------------------------------------------ ECG


@dataclass(frozen=True)
class ECGSpec:
    """The ECG form a model takes: which leads, at what rate, for how long.

    Args:
        leads: lead names, in output order (matched case-insensitively; ``"Lead I (Einthoven)"``,
            ``"MDC_ECG_LEAD_I"`` and ``"I"`` are the same lead).
        sample_rate: samples per second after resampling.
        seconds: duration kept (the record's first ``seconds``).
    """

    leads: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    sample_rate: int = 250
    seconds: float = 10.0

    @property
    def num_samples(self) -> int:
        """Samples per lead: ``round(sample_rate * seconds)``."""
        return int(round(self.sample_rate * self.seconds))

    @classmethod
    def qoq_med_released(cls) -> ECGSpec:
        """The released QoQ-Med input: leads I, II, V1-V6 at 500 Hz over the first 5 s (8 x 2500)."""
        return cls(sample_rate=500, seconds=5.0)


def read_ecg(
    path: str | os.PathLike[str],
    spec: ECGSpec = ECGSpec(),
    *,
    sample_rate: float | None = None,
    leads: tuple[str, ...] | list[str] | None = None,
) -> np.ndarray:
    """Read an ECG, select the spec's leads, resample to its rate and keep its first ``seconds``.

    Sources:

    - WFDB: the ``.hea`` file or the record stem; physical values, converted to mV from the header's
      units.
    - ``.npy`` / ``.pt``: an array ``[leads, T]`` in mV. Rate and lead names come from the arguments,
      else from a sidecar ``<stem>.json`` (``{"sample_rate": 500, "leads": [...], "units": "mV"}``),
      else the spec's own rate and leads are assumed (and the row count must equal the spec's lead
      count).
    - DICOM waveform: the first ORIGINAL multiplex group (else the first), values from pydicom's
      ``waveform_array`` (sensitivity and baseline applied) converted from the channel units (uV) to mV,
      lead names from each channel's ChannelSourceSequence.

    Resampling uses ``scipy.signal.resample_poly`` with the exact rational rate ratio. A record shorter
    than ``spec.seconds`` is rejected (never zero-padded); a longer one is cropped to its start.

    Args:
        path: the ECG file or WFDB record stem.
        spec: the output form.
        sample_rate: the source rate in Hz, overriding the file's (arrays only).
        leads: the source lead names, overriding the file's (arrays only).

    Returns:
        ``[len(spec.leads), spec.num_samples]`` float32, in mV.

    Raises:
        DataError: ``"missing_file"``, ``"unreadable_file"``, ``"corrupt_dicom"``, ``"ecg_shape"``
            (wrong shape or too short), ``"ecg_rate"`` (missing or invalid rate), ``"ecg_leads"``
            (a lead the spec needs is absent), ``"ecg_units"``, ``"ecg_values"`` (NaN / inf).
    """
    signal, names, rate, where = _read_ecg_source(Path(path), spec, sample_rate, leads)
    if signal.ndim != 2 or signal.shape[0] != len(names):
        hint = (
            " (looks transposed: expected [leads, T])"
            if signal.ndim == 2 and signal.shape[1] == len(names)
            else ""
        )
        raise DataError(
            "ecg_shape", f"array of shape {list(signal.shape)} for {len(names)} leads{hint}", path=where
        )
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not np.isfinite(rate) or rate <= 0:
        raise DataError("ecg_rate", f"invalid sample rate {rate!r}", path=where)
    keys = [_lead_key(n) for n in names]
    missing = [lead for lead in spec.leads if _lead_key(lead) not in keys]
    if missing:
        raise DataError("ecg_leads", f"leads {missing} not in the record's {list(names)}", path=where)
    signal = signal[[keys.index(_lead_key(lead)) for lead in spec.leads]].astype(np.float64)
    if not np.isfinite(signal).all():
        raise DataError("ecg_values", "signal holds NaN or infinite values", path=where)
    ratio = Fraction(spec.sample_rate) / Fraction(rate).limit_denominator(100_000)
    if ratio != 1:
        from scipy.signal import resample_poly

        signal = resample_poly(signal, ratio.numerator, ratio.denominator, axis=1)
    need = spec.num_samples
    if signal.shape[1] < need:
        seconds = signal.shape[1] / spec.sample_rate
        raise DataError(
            "ecg_shape", f"{seconds:.3f} s of signal, {spec.seconds:g} s needed (never padded)", path=where
        )
    return np.ascontiguousarray(signal[:, :need], dtype=np.float32)


def _read_ecg_source(
    path: Path, spec: ECGSpec, sample_rate, leads
) -> tuple[np.ndarray, list[str], float, Path]:
    """``(signal [L, T] mV, lead names, rate, file)`` of any supported source."""
    suffix = path.suffix.lower()
    stem = path.with_suffix("") if suffix in (".hea", ".dat") else path
    if suffix in (".hea", ".dat") or (not path.exists() and _header(stem).exists()):
        return (*_read_wfdb(stem), _header(stem))
    path = _existing(path)
    if suffix in (".npy", ".pt"):
        names, rate, mv_per_unit = _array_metadata(path, spec, sample_rate, leads)
        return _load_array(path) * mv_per_unit, names, rate, path
    if is_dicom(path):
        return (*_read_dicom_waveform(path), path)
    raise DataError("unsupported_format", "not a WFDB record, .npy, .pt or DICOM waveform", path=path)


def _read_wfdb(stem: Path) -> tuple[np.ndarray, list[str], float]:
    import wfdb

    header = _header(stem)
    if not header.exists():
        raise DataError("missing_file", "WFDB header not found", path=header)
    try:
        record = wfdb.rdrecord(str(stem), physical=True)
    except Exception as err:
        raise DataError(
            "unreadable_file", f"cannot read WFDB record ({err.__class__.__name__}: {err})", path=header
        ) from None
    if record.p_signal is None:
        raise DataError("unreadable_file", "WFDB record holds no signal", path=header)
    scale = np.array([_mv_per_unit(u, header) for u in record.units])
    return record.p_signal.T * scale[:, None], list(record.sig_name), float(record.fs)


def _header(stem: Path) -> Path:
    return stem.with_name(stem.name + ".hea")


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        import torch

        value = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"expected a tensor, got {type(value).__name__}")
        return value.detach().to(torch.float64).numpy()
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            "unreadable_file", f"cannot read array ({err.__class__.__name__}: {err})", path=path
        ) from None


def _array_metadata(path: Path, spec: ECGSpec, sample_rate, leads) -> tuple[list[str], float, float]:
    """Lead names, rate and mV per stored unit of an array ECG (arguments, else sidecar, else spec)."""
    meta: dict = {}
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError("malformed_json", f"bad ECG sidecar ({err})", path=sidecar) from None
        if not isinstance(meta, dict):
            raise DataError("malformed_json", "ECG sidecar must be a JSON object", path=sidecar)
        if "sample_rate" not in meta and sample_rate is None:
            raise DataError("ecg_rate", "sidecar has no 'sample_rate'", path=sidecar, field="sample_rate")
    rate = sample_rate if sample_rate is not None else meta.get("sample_rate", spec.sample_rate)
    names = list(leads if leads is not None else meta.get("leads", spec.leads))
    if not all(isinstance(n, str) for n in names):
        raise DataError(
            "ecg_leads", f"lead names must be strings, got {names!r}", path=sidecar if meta else path
        )
    return names, rate, _mv_per_unit(meta.get("units", "mV"), sidecar)


def _read_dicom_waveform(path: Path) -> tuple[np.ndarray, list[str], float]:
    ds = _read_dicom(path, DICOM_WAVEFORM_TAGS)
    groups = ds.get("WaveformSequence")
    if not groups:
        raise DataError("corrupt_dicom", "no WaveformSequence (not a waveform DICOM)", path=path)
    index = next((i for i, g in enumerate(groups) if g.get("WaveformOriginality") == "ORIGINAL"), 0)
    group = groups[index]
    try:
        values = ds.waveform_array(index).T  # [C, T]
        channels = group.ChannelDefinitionSequence
        names = [str(ch.ChannelSourceSequence[0].CodeMeaning) for ch in channels]
        units = [
            str(ch.ChannelSensitivityUnitsSequence[0].CodeValue)
            if "ChannelSensitivityUnitsSequence" in ch
            else "uV"
            for ch in channels
        ]
        rate = float(group.SamplingFrequency)
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            "corrupt_dicom", f"cannot decode waveform ({err.__class__.__name__}: {err})", path=path
        ) from None
    scale = np.array([_mv_per_unit(u, path) for u in units])
    return values * scale[:, None], names, rate


def _mv_per_unit(unit: str, where: Path) -> float:
    factor = _MV_PER_UNIT.get(str(unit).strip().casefold())
    if factor is None:
        raise DataError("ecg_units", f"unknown signal unit {unit!r} (know mV, uV, V)", path=where)
    return factor


def _lead_key(name: str) -> str:
    """Canonical lead key: ``"Lead I (Einthoven)"``, ``"MDC_ECG_LEAD_I"``, ``"i"`` -> ``"I"``."""
    key = re.sub(r"\(.*?\)", "", str(name)).strip().upper()
    key = re.sub(r"^(MDC_ECG_LEAD_|LEAD\s+)", "", key)
    return key.replace(" ", "")


def write_wfdb(
    signal_mV: np.ndarray,
    leads: tuple[str, ...] | list[str],
    sample_rate: float,
    path: str | os.PathLike[str],
) -> Path:
    """Write an ECG as a WFDB record (16-bit, header in mV), e.g. to convert a DICOM ECG.

    Only the signal, lead names and rate are written: no comments, dates or patient fields.

    Args:
        signal_mV: ``[leads, T]`` in mV.
        leads: lead names, one per row.
        sample_rate: Hz.
        path: the record stem or its ``.hea`` path (the name may hold letters, digits, ``_`` and ``-``).

    Returns:
        The ``.hea`` path.
    """
    import wfdb

    signal = np.asarray(signal_mV, dtype=np.float64)
    if signal.ndim != 2 or signal.shape[0] != len(leads):
        raise ValueError(f"signal of shape {list(signal.shape)} does not match {len(leads)} leads")
    if not np.isfinite(signal).all():
        raise ValueError("signal holds NaN or infinite values")
    stem = Path(path)
    if stem.suffix.lower() in (".hea", ".dat"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    wfdb.wrsamp(
        stem.name,
        fs=sample_rate,
        units=["mV"] * len(leads),
        sig_name=list(leads),
        p_signal=np.ascontiguousarray(signal.T),
        fmt=["16"] * len(leads),
        write_dir=str(stem.parent),
    )
    return _header(stem)
