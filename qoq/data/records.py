"""The clinical record: one JSONL line of a manifest (CLIMB layout, with qoq's explicit fields)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qoq.data.domains import DOMAINS
from qoq.data.errors import DataError
from qoq.types import PLACEHOLDERS

#: Record fields that hold file paths (resolved against the manifest's folder when read).
PATH_FIELDS: tuple[str, ...] = ("images", "videos", "time_series")

#: Which placeholder in ``problem`` stands for an item of each path field.
_PLACEHOLDER_OF: dict[str, str] = {
    "images": PLACEHOLDERS["image"],
    "videos": PLACEHOLDERS["video"],
    "time_series": PLACEHOLDERS["ecg"],
}

ORIGINS: tuple[str, ...] = ("real", "synthetic")

_REQUIRED: tuple[str, ...] = ("id", "problem", "answer", "labels", "domain", "dataset")


@dataclass(frozen=True)
class Record:
    """One question about one patient study.

    Attributes:
        id: unique id within the manifest.
        problem: question text with ``<image>`` / ``<video>`` / ``<ecg>`` placeholders, one per item.
        answer: ground-truth label(s); the manifest stores them joined by ", ".
        labels: the dataset's closed label set.
        domain: clinical domain (one of :data:`qoq.data.domains.DOMAINS`).
        dataset: dataset name within the domain.
        images: image paths (absolute once read from a manifest).
        videos: video / 3-D volume paths, sampled into frames.
        time_series: ECG paths (WFDB record, ``.npy``, ``.pt`` or DICOM waveform).
        bbox: ground-truth boxes ``x1, y1, x2, y2`` in original pixels of ``images[0]``.
        segmentation_path: ground-truth mask path (original pixels of ``images[0]``), or None.
        origin: "real" or "synthetic".
        label_source: where the label came from (e.g. "dicom header", "overlay", "generator").
        source: provenance: package, path inside it, licence.
    """

    id: str
    problem: str
    answer: tuple[str, ...]
    labels: tuple[str, ...]
    domain: str
    dataset: str
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    time_series: tuple[str, ...] = ()
    bbox: tuple[tuple[float, float, float, float], ...] = ()
    segmentation_path: str | None = None
    origin: str = "real"
    label_source: str = ""
    source: dict[str, Any] = field(default_factory=dict)

    def to_json(self, relative_to: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """The manifest form (answer joined by ", ").

        Args:
            relative_to: when given, file paths are written relative to this folder (the manifest's),
                so a manifest and its files can move together. None keeps them as they are.

        Returns:
            A JSON-serialisable dict with exactly the record's fields.
        """
        out = asdict(self)
        out["answer"] = ", ".join(self.answer)
        out["labels"] = list(self.labels)
        out["bbox"] = [list(b) for b in self.bbox]
        for key in PATH_FIELDS:
            out[key] = [_relative(p, relative_to) for p in out[key]]
        if self.segmentation_path is not None:
            out["segmentation_path"] = _relative(self.segmentation_path, relative_to)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, base_dir: str | os.PathLike[str], where: str = "") -> Record:
        """Validate one manifest object and build its record.

        Checks: the required fields (``id``, ``problem``, ``answer``, ``labels``, ``domain``,
        ``dataset``) and their types; ``domain`` one of :data:`qoq.data.domains.DOMAINS`; no unknown
        fields; the answer labels are a non-empty subset of ``labels`` (matched case-insensitively
        and rewritten in the label set's spelling); exactly one placeholder in ``problem`` per image /
        video / ECG item; boxes of four finite numbers with ``x1 <= x2`` and ``y1 <= y2``, and boxes
        or masks only on records with an image; ``origin`` in ``{"real", "synthetic"}``. Relative
        paths are resolved against ``base_dir``; whether the files exist is the caller's check
        (:func:`qoq.data.manifest.read_manifest` does it).

        ``answer`` may be a list or a string joined by ", " (a label that itself contains ", " is
        recognised when the whole string is in the label set). ``bbox`` may also be one flat box.

        Args:
            obj: the parsed JSON object.
            base_dir: folder that relative paths are relative to (the manifest's folder).
            where: location for error messages (e.g. the manifest path), or "".

        Returns:
            The validated record.

        Raises:
            DataError: naming ``where`` and the field at fault.
        """
        if not isinstance(obj, dict):
            raise DataError(
                "bad_record", f"expected a JSON object, got {type(obj).__name__}", path=where or None
            )

        def fail(reason: str, fld: str, detail: str) -> DataError:
            return DataError(reason, detail, path=where or None, field=fld)

        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise fail(
                "unknown_field", unknown[0], f"unknown field (known: {', '.join(cls.__dataclass_fields__)})"
            )
        for key in _REQUIRED:
            if obj.get(key) in (None, "", []):
                raise fail("missing_field", key, "required field is missing or empty")

        rid = obj["id"]
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise fail("bad_field", "id", f"expected a string, got {type(rid).__name__}")
        text = {k: _string(obj, k, fail) for k in ("problem", "domain", "dataset")}
        if text["domain"] not in DOMAINS:
            raise fail("bad_field", "domain", f"{text['domain']!r} is not one of {list(DOMAINS)}")

        labels = _string_list(obj, "labels", fail)
        folded = [lab.casefold() for lab in labels]
        if len(set(folded)) != len(folded):
            raise fail("bad_field", "labels", f"labels repeat (case-insensitively): {labels}")
        answer = _answer(obj["answer"], labels, fail)

        base = Path(base_dir)
        paths = {
            k: tuple(_resolve(p, base) for p in _string_list(obj, k, fail, required=False))
            for k in PATH_FIELDS
        }
        for key, items in paths.items():
            n = text["problem"].count(_PLACEHOLDER_OF[key])
            if n != len(items):
                raise fail(
                    "placeholder_mismatch",
                    "problem",
                    f"{n} '{_PLACEHOLDER_OF[key]}' placeholder(s) for {len(items)} item(s) in '{key}'",
                )

        bbox = _boxes(obj.get("bbox") or [], fail)
        seg = obj.get("segmentation_path")
        if seg is not None and (not isinstance(seg, str) or not seg):
            raise fail("bad_field", "segmentation_path", "expected a path string or null")
        if (bbox or seg) and not paths["images"]:
            raise fail(
                "bad_field", "bbox" if bbox else "segmentation_path", "a region needs an image to refer to"
            )

        origin = obj.get("origin", "real")
        if origin not in ORIGINS:
            raise fail("bad_field", "origin", f"{origin!r} is not one of {list(ORIGINS)}")
        label_source = obj.get("label_source", "")
        if not isinstance(label_source, str):
            raise fail("bad_field", "label_source", "expected a string")
        source = obj.get("source") or {}
        if not isinstance(source, dict):
            raise fail("bad_field", "source", "expected an object")

        return cls(
            id=str(rid),
            problem=text["problem"],
            answer=answer,
            labels=labels,
            domain=text["domain"],
            dataset=text["dataset"],
            images=paths["images"],
            videos=paths["videos"],
            time_series=paths["time_series"],
            bbox=bbox,
            segmentation_path=None if seg is None else _resolve(seg, base),
            origin=origin,
            label_source=label_source,
            source=dict(source),
        )

    def validated(self, where: str = "") -> Record:
        """This record after the checks of :meth:`from_json` (for records built in code).

        Args:
            where: location for error messages.

        Returns:
            An equal record (answer spelling normalised to the label set's).

        Raises:
            DataError: as :meth:`from_json`.
        """
        return Record.from_json(self.to_json(), base_dir=Path.cwd(), where=where)

    def files(self) -> list[tuple[str, str]]:
        """Every file the record refers to, as ``(field, path)`` pairs."""
        out = [(key, p) for key in PATH_FIELDS for p in getattr(self, key)]
        if self.segmentation_path is not None:
            out.append(("segmentation_path", self.segmentation_path))
        return out


def _relative(path: str, folder: str | os.PathLike[str] | None) -> str:
    if folder is None:
        return path
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


def _resolve(path: str, base: Path) -> str:
    return os.path.normpath(os.path.join(base, path))


def _string(obj: dict[str, Any], key: str, fail) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise fail("bad_field", key, f"expected a non-empty string, got {value!r}")
    return value


def _string_list(obj: dict[str, Any], key: str, fail, *, required: bool = True) -> tuple[str, ...]:
    value = obj.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise fail("bad_field", key, f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _answer(value: Any, labels: tuple[str, ...], fail) -> tuple[str, ...]:
    spelling = {lab.casefold(): lab for lab in labels}
    if isinstance(value, str):
        parts = [value] if value.strip().casefold() in spelling else value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        parts = value
    else:
        raise fail("bad_field", "answer", f"expected a string or a list of strings, got {value!r}")
    parts = [p.strip() for p in parts if p.strip()]
    if not parts:
        raise fail("missing_field", "answer", "the answer names no label")
    out: list[str] = []
    for part in parts:
        label = spelling.get(part.casefold())
        if label is None:
            raise fail("answer_not_in_labels", "answer", f"{part!r} is not in the label set {list(labels)}")
        if label not in out:
            out.append(label)
    return tuple(out)


def _boxes(value: Any, fail) -> tuple[tuple[float, float, float, float], ...]:
    if not isinstance(value, list):
        raise fail("bad_field", "bbox", f"expected a list of [x1, y1, x2, y2] boxes, got {value!r}")
    if value and all(_is_number(v) for v in value):
        value = [value]  # one flat box
    boxes = []
    for box in value:
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise fail("bad_field", "bbox", f"expected [x1, y1, x2, y2], got {box!r}")
        x1, y1, x2, y2 = (float(v) for v in box)
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 < x1 or y2 < y1:
            raise fail("bad_field", "bbox", f"box {box} needs finite values with x1 <= x2 and y1 <= y2")
        boxes.append((x1, y1, x2, y2))
    return tuple(boxes)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
