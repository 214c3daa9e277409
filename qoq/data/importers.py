"""Importers for public clinical datasets in their distributed layouts (users bring the data).

Each ``import_<name>(root, ...) -> list[Record]`` reads the dataset's own tables and folders and
returns validated records with absolute paths; :func:`import_dataset` also writes them as a manifest.
Nothing is downloaded.

Privacy: records carry no patient ids, names, ages, sexes or dates (PTB-XL's ``patient_id``,
CheXpert's ``Sex`` / ``Age``, HAM10000's ``age`` / ``sex`` / ``lesion_id`` are read only where needed
and never stored). File paths stay as the dataset names them: CheXpert's contain folder names like
``patient00001``, dataset-assigned pseudonyms that appear in paths only. Record ids are built from row
numbers or image names, never from patient fields.

Bad rows (unknown codes, missing files) raise :class:`~qoq.data.errors.DataError` naming the table,
line and column; with ``skip_invalid=True`` they are skipped and counted in ``counter`` instead.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from qoq.data.domains import CHEXPERT_LABELS, ECG_LABELS, SKIN_LESIONS, known_dataset
from qoq.data.errors import DataError, SkipCounter
from qoq.data.manifest import import_climb, write_manifest
from qoq.data.records import Record
from qoq.data.transforms import load_mask, mask_box
from qoq.types import PLACEHOLDERS

log = logging.getLogger(__name__)

#: PTB-XL diagnostic superclass -> qoq ECG label.
PTBXL_SUPERCLASSES: Mapping[str, str] = MappingProxyType(
    {"NORM": "normal", "MI": "MI", "STTC": "STTC", "CD": "CD", "HYP": "HYP"}
)
#: PTB-XL rhythm statements counted as "AFib" (atrial fibrillation / flutter, as CLIMB grouped them).
PTBXL_AFIB_CODES: tuple[str, ...] = ("AFIB", "AFLT")
#: HAM10000 ``dx`` code -> qoq skin-lesion label.
HAM10000_DX: Mapping[str, str] = MappingProxyType(
    {
        "mel": "melanoma",
        "nv": "nevus",
        "bcc": "BCC",
        "akiec": "AKIEC",
        "bkl": "other",
        "df": "other",
        "vasc": "other",
    }
)
_HAM_DX_TYPE = {"histo": "histopathology", "follow_up": "follow-up", "consensus": "expert consensus",
                "confocal": "confocal microscopy"}  # fmt: skip
BUSI_CLASSES: tuple[str, ...] = ("normal", "benign", "malignant")


def _question(placeholder: str, subject: str, labels: Sequence[str], multi: bool) -> str:
    more = " More than one may apply." if multi else " Choose one."
    return f"{placeholder}\n{subject} Options: {', '.join(labels)}.{more}"


class _Rows:
    """Rows of a CSV table with their 1-based line numbers, failing with the table's name."""

    def __init__(self, path: Path, required: Sequence[str]) -> None:
        if not path.is_file():
            raise DataError("missing_file", "table not found", path=path)
        self.path = path
        self.required = required

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in self.required if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError("missing_field", f"table lacks columns {missing}", path=self.path, line=1)
            for row in reader:
                yield reader.line_num, row


def _collect(
    rows: Iterator[tuple[int, Any]],
    build: Callable[[int, Any], Record | None],
    table: Path,
    skip_invalid: bool,
    counter: SkipCounter | None,
) -> list[Record]:
    """Build and validate a record per row; a bad row raises or is counted.

    An error about a row (no path of its own) is located at ``table:line``; one about a file keeps it.
    """
    counter = counter if counter is not None else SkipCounter()
    out = []
    for line, row in rows:
        try:
            record = build(line, row)
            if record is not None:
                record = record.validated()
        except DataError as err:
            err = err if err.path else err.located(table, line)
            if not skip_invalid:
                raise err from None
            counter.add(err)
            log.warning("skipping %s", err)
            continue
        if record is not None:
            out.append(record)
    if not out:
        raise DataError("empty_manifest", "no records imported", path=table)
    return out


def _group_split(key: str, val: float = 0.1, test: float = 0.1) -> str:
    """A deterministic train/val/test split by a group key (all images of one lesion stay together)."""
    u = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    return "test" if u < test else "val" if u < test + val else "train"


# -------------------------------------------------------------------------------------------- PTB-XL


def import_ptbxl(
    root: str | os.PathLike[str],
    *,
    sampling_rate: Literal[100, 500] = 500,
    min_likelihood: float = 0.0,
    skip_invalid: bool = False,
    counter: SkipCounter | None = None,
) -> list[Record]:
    """PTB-XL: ``ptbxl_database.csv`` + ``scp_statements.csv`` + WFDB ``records500/`` (or ``records100/``).

    Labels: each SCP code of a record whose statement is diagnostic contributes its diagnostic
    superclass (NORM -> ``normal``, MI, STTC, CD, HYP); the rhythm statements AFIB and AFLT add
    ``AFib``; a record with none of these is ``other`` (CLIMB's catch-all). Codes with a likelihood
    below ``min_likelihood`` are ignored (0 keeps all, like PTB-XL's reference code). Split: the
    recommended ``strat_fold`` use (1-8 train, 9 val, 10 test), in ``source["split"]``.

    Args:
        root: folder holding ``ptbxl_database.csv``.
        sampling_rate: 500 (``filename_hr``) or 100 (``filename_lr``).
        min_likelihood: least SCP likelihood (0-100) for a code to count.
        skip_invalid: skip and count bad rows instead of failing.
        counter: where skips are counted.

    Returns:
        One record per ECG (domain ``ecg``, dataset ``PTB-XL``, multi-label).
    """
    root = Path(root)
    statements = _ptbxl_statements(root / "scp_statements.csv")
    column = {500: "filename_hr", 100: "filename_lr"}[sampling_rate]
    table = root / "ptbxl_database.csv"
    question = _question(
        PLACEHOLDERS["ecg"], "Which diagnostic classes does this ECG show?", ECG_LABELS, multi=True
    )

    def build(line: int, row: dict[str, str]) -> Record:
        try:
            codes = ast.literal_eval(row["scp_codes"] or "{}")
            if not isinstance(codes, dict):
                raise ValueError
        except (ValueError, SyntaxError):
            raise DataError(
                "bad_field", f"not a code dict: {row['scp_codes']!r}", field="scp_codes"
            ) from None
        found = []
        for code, likelihood in codes.items():
            if not isinstance(likelihood, (int, float)):
                raise DataError("bad_field", f"likelihood of {code} is {likelihood!r}", field="scp_codes")
            if likelihood < min_likelihood or code not in statements:
                continue
            superclass, rhythm = statements[code]
            label = PTBXL_SUPERCLASSES.get(superclass) or ("AFib" if rhythm else None)
            if label and label not in found:
                found.append(label)
        stem = root / (row[column] or "")
        if not row[column] or not stem.with_name(stem.name + ".hea").exists():
            raise DataError("missing_file", f"WFDB record not found: {stem}", field=column)
        try:
            fold = int(float(row.get("strat_fold") or 0))
        except ValueError:
            raise DataError(
                "bad_field", f"not a fold number: {row['strat_fold']!r}", field="strat_fold"
            ) from None
        return Record(
            id=f"ptbxl-{row['ecg_id']}",
            problem=question,
            answer=tuple(lab for lab in ECG_LABELS if lab in found) or ("other",),
            labels=ECG_LABELS,
            domain="ecg",
            dataset="PTB-XL",
            time_series=(str(stem),),
            label_source="PTB-XL SCP statements (cardiologist-annotated)",
            source={
                "dataset": "PTB-XL",
                "path": row[column],
                "licence": "CC BY 4.0",
                "split": "test" if fold == 10 else "val" if fold == 9 else "train",
            },
        )

    rows = _Rows(table, ("ecg_id", "scp_codes", column))
    return _collect(iter(rows), build, table, skip_invalid, counter)


def _ptbxl_statements(path: Path) -> dict[str, tuple[str, bool]]:
    """SCP code -> (diagnostic superclass or "", is an AFib rhythm statement)."""
    if not path.is_file():
        raise DataError("missing_file", "table not found", path=path)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        try:
            diag, cls = header.index("diagnostic"), header.index("diagnostic_class")
        except ValueError:
            raise DataError(
                "missing_field", "needs 'diagnostic' and 'diagnostic_class'", path=path, line=1
            ) from None
        out = {}
        for row in reader:
            if not row:
                continue
            code = row[0]
            is_diag = row[diag].strip() in ("1", "1.0")
            out[code] = (row[cls].strip() if is_diag else "", code in PTBXL_AFIB_CODES)
    return out


# ---------------------------------------------------------------------------------------------- BUSI


def import_busi(
    root: str | os.PathLike[str],
    *,
    mask_dir: str | os.PathLike[str] | None = None,
    skip_invalid: bool = False,
    counter: SkipCounter | None = None,
) -> list[Record]:
    """BUSI breast ultrasound: class folders ``benign/``, ``malignant/``, ``normal/`` of PNG images with
    ``<name>_mask.png`` (and ``<name>_mask_1.png``, ...) siblings.

    Each non-empty mask gives one box (``bbox``, tight around it); the segmentation mask is the image's
    mask, or, for an image with several masks, their union written to ``mask_dir`` (without
    ``mask_dir`` the first mask is used and ``source["extra_masks"]`` counts the others). ``normal``
    images have empty masks, so no region.

    Args:
        root: folder holding the class folders (or ``Dataset_BUSI_with_GT/`` holding them).
        mask_dir: where union masks of multi-mask images are written, or None.
        skip_invalid: skip and count bad images instead of failing.
        counter: where skips are counted.

    Returns:
        One record per image (domain ``ultrasound``, dataset ``BUSI``).
    """
    root = Path(root)
    if not any((root / c).is_dir() for c in BUSI_CLASSES) and (root / "Dataset_BUSI_with_GT").is_dir():
        root = root / "Dataset_BUSI_with_GT"
    labels = known_dataset("BUSI").labels
    question = _question(
        PLACEHOLDERS["image"],
        "Is the finding in this breast ultrasound normal, benign or malignant?",
        labels,
        False,
    )
    items = []
    for label in BUSI_CLASSES:
        folder = root / label
        if folder.is_dir():
            items += [(label, p) for p in sorted(folder.glob("*.png")) if "_mask" not in p.stem]
    if not items:
        raise DataError("missing_file", f"no class folders {list(BUSI_CLASSES)} with images", path=root)

    def build(_: int, item: tuple[str, Path]) -> Record:
        label, image = item
        masks = sorted(image.parent.glob(f"{_glob_escape(image.stem)}_mask*.png"))
        arrays = [load_mask(m) for m in masks]
        boxes = tuple(b for b in (mask_box(a) for a in arrays) if b is not None)
        seg, extra = None, 0
        if boxes and len(masks) == 1:
            seg = str(masks[0])
        elif boxes and mask_dir is not None:
            seg = _write_union(arrays, Path(mask_dir) / f"{label}_{image.stem}_mask.png", image)
        elif boxes:
            seg, extra = str(masks[0]), len(masks) - 1
        source = {"dataset": "BUSI", "path": f"{label}/{image.name}"}
        if extra:
            source["extra_masks"] = extra
        return Record(
            id=f"busi-{label}-{_slug(image.stem)}",
            problem=question,
            answer=(label,),
            labels=labels,
            domain="ultrasound",
            dataset="BUSI",
            images=(str(image),),
            bbox=boxes,
            segmentation_path=seg,
            label_source="BUSI class folder (radiologist review)",
            source=source,
        )

    return _collect(enumerate(items, start=1), build, root, skip_invalid, counter)


def _glob_escape(text: str) -> str:
    """Escape glob metacharacters (BUSI names hold parentheses, some datasets brackets)."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def _write_union(arrays: list[np.ndarray], path: Path, image: Path) -> str:
    from PIL import Image

    if len({a.shape for a in arrays}) != 1:
        raise DataError("bad_shape", "masks of one image differ in size", path=image)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.logical_or.reduce(arrays).astype(np.uint8) * 255).save(path)
    return str(path)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


# ------------------------------------------------------------------------------------------ HAM10000


def import_ham10000(
    root: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    counter: SkipCounter | None = None,
) -> list[Record]:
    """HAM10000 dermoscopy: ``HAM10000_metadata.csv`` and ``<image_id>.jpg`` anywhere under ``root``
    (the distribution splits them into ``HAM10000_images_part_1/`` and ``_part_2/``).

    Labels: ``dx`` mel -> melanoma, nv -> nevus, bcc -> BCC, akiec -> AKIEC, and bkl / df / vasc ->
    other. ``label_source`` records how the diagnosis was made (``dx_type``). Split: by a hash of
    ``lesion_id`` (80/10/10), so images of one lesion never straddle splits; the id itself is not kept.

    Args:
        root: folder holding ``HAM10000_metadata.csv`` and the image folders.
        skip_invalid: skip and count bad rows instead of failing.
        counter: where skips are counted.

    Returns:
        One record per image (domain ``dermoscopy``, dataset ``HAM10000``).
    """
    root = Path(root)
    table = root / "HAM10000_metadata.csv"
    rows = _Rows(table, ("lesion_id", "image_id", "dx", "dx_type"))
    images = {p.stem: p for p in root.rglob("*.jpg")}
    question = _question(
        PLACEHOLDERS["image"],
        "Which kind of skin lesion does this dermoscopy image show?",
        SKIN_LESIONS,
        False,
    )

    def build(_: int, row: dict[str, str]) -> Record:
        label = HAM10000_DX.get(row["dx"].strip().lower())
        if label is None:
            raise DataError(
                "bad_field", f"unknown dx code {row['dx']!r} (know {sorted(HAM10000_DX)})", field="dx"
            )
        image = images.get(row["image_id"].strip())
        if image is None:
            raise DataError("missing_file", f"no image {row['image_id']}.jpg under {root}", field="image_id")
        return Record(
            id=f"ham10000-{row['image_id'].strip()}",
            problem=question,
            answer=(label,),
            labels=SKIN_LESIONS,
            domain="dermoscopy",
            dataset="HAM10000",
            images=(str(image),),
            label_source=_HAM_DX_TYPE.get(row["dx_type"].strip(), row["dx_type"].strip()),
            source={
                "dataset": "HAM10000",
                "path": image.relative_to(root).as_posix(),
                "dx": row["dx"].strip(),
                "split": _group_split(row["lesion_id"].strip()),
            },
        )

    return _collect(iter(rows), build, table, skip_invalid, counter)


# ------------------------------------------------------------------------------------------ CheXpert


def import_chexpert(
    root: str | os.PathLike[str],
    *,
    splits: Sequence[str] = ("train", "valid"),
    uncertain: Literal["positive", "negative", "skip"] = "negative",
    frontal_only: bool = False,
    skip_invalid: bool = False,
    counter: SkipCounter | None = None,
) -> list[Record]:
    """CheXpert: ``<split>.csv`` tables (``Path``, ``Frontal/Lateral``, ``AP/PA`` and the 14 findings).

    Finding values: 1.0 positive, 0.0 or blank negative, -1.0 uncertain, handled by ``uncertain``:
    ``"positive"`` (U-Ones), ``"negative"`` (U-Zeros) or ``"skip"`` (drop the image; counted under
    ``"uncertain_label"`` when a counter is given). An image with no positive finding is answered
    ``No Finding``; otherwise the positives are kept as the table gives them (``No Finding`` may
    stand next to ``Support Devices``, which is not a pathology). ``Path`` is resolved against
    ``root``'s parent when it starts with ``root``'s name (``CheXpert-v1.0-small/train/...``), else
    against ``root``. Sex and age are never read into records.

    Args:
        root: the dataset folder holding the CSV tables.
        splits: which tables to read (``train``, ``valid``); the split goes to ``source["split"]``.
        uncertain: the policy for -1.0 labels.
        frontal_only: keep frontal views only.
        skip_invalid: skip and count bad rows instead of failing.
        counter: where skips are counted.

    Returns:
        One record per image (domain ``chest_xray``, dataset ``CheXpert``, multi-label).
    """
    if uncertain not in ("positive", "negative", "skip"):
        raise ValueError(f"uncertain must be 'positive', 'negative' or 'skip', got {uncertain!r}")
    root = Path(root)
    counter = counter if counter is not None else SkipCounter()
    records: list[Record] = []
    for split in splits:
        table = root / f"{split}.csv"
        rows = _Rows(table, ("Path", "Frontal/Lateral", *CHEXPERT_LABELS))
        build = _chexpert_builder(root, split, uncertain, frontal_only, counter)
        records += _collect(iter(rows), build, table, skip_invalid, counter)
    return records


def _chexpert_builder(root: Path, split: str, uncertain: str, frontal_only: bool, counter: SkipCounter):
    table = root / f"{split}.csv"

    def build(line: int, row: dict[str, str]) -> Record | None:
        view = row["Frontal/Lateral"].strip().lower()
        if frontal_only and view != "frontal":
            return None
        positive = []
        for finding in CHEXPERT_LABELS:
            value = _chexpert_value(row[finding], finding)
            if value == -1:
                if uncertain == "skip":
                    detail = "uncertain finding (policy 'skip')"
                    counter.add(DataError("uncertain_label", detail, path=table, line=line, field=finding))
                    return None
                value = 1 if uncertain == "positive" else 0
            if value == 1:
                positive.append(finding)
        rel = Path(row["Path"].strip())
        image = (root.parent if rel.parts and rel.parts[0] == root.name else root) / rel
        projection = (row.get("AP/PA") or "").strip()
        subject = (
            f"Which findings does this chest X-ray ({view}{', ' + projection if projection else ''}) show?"
        )
        return Record(
            id=f"chexpert-{split}-{line - 1:06d}",
            problem=_question(PLACEHOLDERS["image"], subject, CHEXPERT_LABELS, multi=True),
            answer=tuple(positive) or ("No Finding",),
            labels=CHEXPERT_LABELS,
            domain="chest_xray",
            dataset="CheXpert",
            images=(str(image),),
            label_source=f"CheXpert report labeler (uncertain -> {uncertain})",
            source={"dataset": "CheXpert", "split": split, "view": view, "projection": projection},
        )

    return build


def _chexpert_value(text: str, finding: str) -> int:
    text = (text or "").strip()
    if not text:
        return 0
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value not in (1.0, 0.0, -1.0):
        raise DataError("bad_field", f"expected 1.0, 0.0, -1.0 or blank, got {text!r}", field=finding)
    return int(value)


# -------------------------------------------------------------------------------------------- registry

#: Importer per dataset kind (read-only).
IMPORTERS: Mapping[str, Callable[..., list[Record]]] = MappingProxyType(
    {
        "ptbxl": import_ptbxl,
        "busi": import_busi,
        "ham10000": import_ham10000,
        "chexpert": import_chexpert,
        "climb": import_climb,
    }
)


def import_dataset(
    kind: str, root: str | os.PathLike[str], out: str | os.PathLike[str], **kw: Any
) -> list[Record]:
    """Import a dataset and write its manifest.

    Args:
        kind: one of :data:`IMPORTERS` (``ptbxl``, ``busi``, ``ham10000``, ``chexpert``, ``climb``).
        root: the dataset folder (for ``climb``: the CLIMB JSON/JSONL file).
        out: the manifest to write; its paths are relative to its folder. BUSI union masks go to
            ``<out folder>/<out stem>_masks/`` unless ``mask_dir`` is given.
        **kw: the importer's own options.

    Returns:
        The imported records.
    """
    if kind not in IMPORTERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(IMPORTERS)}")
    out = Path(out)
    if kind == "busi":
        kw.setdefault("mask_dir", out.parent / f"{out.stem}_masks")
    records = IMPORTERS[kind](root, **kw)
    write_manifest(records, out)
    log.info("imported %d %s records into %s\n%s", len(records), kind, out, label_counts(records))
    return records


def label_counts(records: Sequence[Record]) -> str:
    """A text table of records per domain / dataset / label (every label of the set, zeros included).

    A multi-label record counts once under each of its labels; the ``(records)`` row of a dataset
    counts records, with real / synthetic shares.

    Args:
        records: the records to count.

    Returns:
        The table, one row per line.
    """
    rows: list[tuple[str, str, str, str]] = [("domain", "dataset", "label", "count")]
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.domain, r.dataset), []).append(r)
    for (domain, dataset), group in sorted(groups.items()):
        counts = Counter(label for r in group for label in r.answer)
        labels = dict.fromkeys(label for r in group for label in r.labels)
        for label in labels:
            rows.append((domain, dataset, label, str(counts[label])))
        real = sum(r.origin == "real" for r in group)
        rows.append(
            (domain, dataset, "(records)", f"{len(group)} ({real} real, {len(group) - real} synthetic)")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )
