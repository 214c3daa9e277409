"""What ``qoq predict`` runs a policy on: unlabelled manifests, or one file and a question.

An unlabelled manifest line needs only ``problem`` and its files; the other record fields are
optional (``labels`` lets the answer be read into the closed label set, ``answer`` is copied to the
output as ``gold``, ``domain`` / ``dataset`` are carried through). A line that has both ``answer`` and
``labels`` is read as a full record (:meth:`qoq.data.records.Record.from_json`), so a labelled manifest
works too. When ``problem`` has no placeholder at all, one per file is put in front of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from qoq.data.domains import DOMAINS
from qoq.data.errors import DataError
from qoq.data.loaders import is_dicom
from qoq.data.manifest import verify_files
from qoq.data.records import PATH_FIELDS, Record
from qoq.types import PLACEHOLDERS

#: Domain and dataset name of a prediction input that does not give one.
UNSPECIFIED = "unspecified"

#: The record path field that holds items of each modality kind.
_FIELD_OF_KIND: dict[str, str] = {"image": "images", "video": "videos", "ecg": "time_series"}
_KIND_OF_FIELD: dict[str, str] = {v: k for k, v in _FIELD_OF_KIND.items()}


@dataclass
class PredictInput:
    """The inputs of ``qoq predict``: unlabelled manifests, or one file plus a question.

    Args:
        manifests: JSONL manifests; each line needs ``problem`` and its files (``images``, ``videos``,
            ``time_series``); ``id``, ``labels``, ``answer``, ``domain`` and ``dataset`` are optional.
        file: one image, video / 3-D volume (NIfTI, multi-frame DICOM, DICOM series folder) or ECG
            (WFDB record, DICOM waveform) to ask ``question`` about.
        question: the question about ``file``.
        kind: ``image``, ``video`` or ``ecg``; None guesses it from the file (``.npy`` / ``.pt`` arrays
            need it).
        labels: the closed label set the answer about ``file`` is read into, or None.
        domain: the clinical domain of ``file`` (one of :data:`qoq.data.domains.DOMAINS`), or None.
        out: the predictions JSONL; default ``<run dir>/predictions/<manifest or file name>.jsonl``.
    """

    manifests: list[str] | None = None
    file: str | None = None
    question: str | None = None
    kind: str | None = None
    labels: list[str] | None = None
    domain: str | None = None
    out: str | None = None

    @property
    def name(self) -> str:
        """A short name of the inputs, for the default output file."""
        if self.file:
            return Path(self.file.rstrip("/")).name.split(".")[0] or "file"
        return "+".join(Path(m).name.split(".")[0] for m in self.manifests or []) or "predictions"

    def records(self) -> list[Record]:
        """The records to predict on, files checked.

        Raises:
            DataError: naming the file, line and field at fault (a missing file, a bad line, ...).
            ValueError: neither manifests nor a file and question were given.
        """
        if self.file:
            if not self.question:
                raise ValueError("predict: `file` needs a `question` (--data.predict.question '...')")
            return [file_record(self.file, self.question, self.kind, self.labels, self.domain)]
        if not self.manifests:
            raise ValueError("predict: give --data.predict.manifests '[...]' or --data.predict.file F "
                             "--data.predict.question Q")
        records: list[Record] = []
        seen: dict[str, str] = {}
        for manifest in self.manifests:
            for record in read_unlabelled(manifest):
                if record.id in seen:
                    raise DataError("duplicate_id", f"id {record.id!r} also in {seen[record.id]}", path=manifest)
                seen[record.id] = manifest
                records.append(record)
        return records


def guess_kind(path: str | os.PathLike[str]) -> str:
    """The modality kind of a file: ``image``, ``video`` (volumes, cines, series folders) or ``ecg``.

    Raises:
        DataError: ``"missing_file"``, or ``"unknown_kind"`` for arrays (``.npy`` / ``.pt``), which may be
            any kind.
    """
    p = Path(path)
    name = p.name.lower()
    if not p.exists():
        if Path(f"{p}.hea").exists():  # a WFDB record named by its stem
            return "ecg"
        raise DataError("missing_file", "file not found", path=p)
    if p.is_dir() or name.endswith((".nii", ".nii.gz")):
        return "video"
    if name.endswith((".hea", ".dat")):
        return "ecg"
    if name.endswith((".npy", ".pt")):
        raise DataError("unknown_kind", "an array may be an image, a volume or an ECG: give --data.predict.kind",
                        path=p)
    if is_dicom(p):
        import pydicom

        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception as err:  # noqa: BLE001 - any pydicom failure is a corrupt file here
            raise DataError("corrupt_dicom", f"cannot read DICOM ({type(err).__name__})", path=p) from None
        if "WaveformSequence" in ds:
            return "ecg"
        return "video" if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else "image"
    return "image"


def file_record(
    file: str, question: str, kind: str | None = None, labels: list[str] | None = None, domain: str | None = None
) -> Record:
    """The record of one file and a question (placeholder in front of the question).

    Raises:
        DataError: the file is missing, its kind cannot be guessed, or ``kind`` / ``domain`` is unknown.
    """
    kind = kind or guess_kind(file)
    if kind not in _FIELD_OF_KIND:
        raise DataError("bad_field", f"{kind!r} is not one of {list(_FIELD_OF_KIND)}", field="kind")
    obj = {"id": Path(file.rstrip("/")).name, "problem": question, _FIELD_OF_KIND[kind]: [os.path.abspath(file)]}
    if labels:
        obj["labels"] = list(labels)
    if domain:
        obj["domain"] = domain
    record = unlabelled_record(obj, base_dir=Path.cwd())
    verify_files(record)
    return record


def read_unlabelled(path: str | os.PathLike[str]) -> list[Record]:
    """Read a manifest whose lines may lack the gold fields (see the module docstring); files checked.

    Raises:
        DataError: located at ``path:line`` (a missing file names its field and path).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("missing_file", "manifest not found", path=path)
    records = []
    for lineno, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError("malformed_json", f"invalid JSON: {err.msg} (column {err.colno})") from None
            if isinstance(obj, dict):
                obj.setdefault("id", f"{path.stem}-{lineno}")
            record = unlabelled_record(obj, base_dir=path.parent, where=str(path))
            verify_files(record)
        except DataError as err:
            raise err.located(path, lineno) from None
        records.append(record)
    if not records:
        raise DataError("empty_manifest", "no records", path=path)
    return records


def unlabelled_record(obj: object, *, base_dir: str | os.PathLike[str], where: str = "") -> Record:
    """Validate one prediction input; ``answer`` and ``labels`` together make it a full record.

    Raises:
        DataError: naming the field at fault.
    """
    if not isinstance(obj, dict):
        raise DataError("bad_record", f"expected a JSON object, got {type(obj).__name__}")

    def fail(fld: str, detail: str) -> DataError:
        return DataError("bad_field", detail, field=fld)

    unknown = sorted(set(obj) - set(Record.__dataclass_fields__))
    if unknown:
        raise DataError("unknown_field", f"unknown field (known: {', '.join(Record.__dataclass_fields__)})",
                        field=unknown[0])
    obj = dict(obj)
    problem = obj.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise DataError("missing_field", "required field is missing or empty", field="problem")
    if not any(p in problem for p in PLACEHOLDERS.values()):
        tags = [PLACEHOLDERS[_KIND_OF_FIELD[f]] for f in PATH_FIELDS for _ in obj.get(f) or []]
        obj["problem"] = "".join(tags) + ("\n" if tags else "") + problem
    for key in ("domain", "dataset"):
        if not obj.get(key):
            obj[key] = UNSPECIFIED
    if obj.get("answer") and obj.get("labels") and obj["domain"] != UNSPECIFIED:
        return Record.from_json(obj, base_dir=base_dir, where=where)
    if obj["domain"] not in (*DOMAINS, UNSPECIFIED):
        raise fail("domain", f"{obj['domain']!r} is not one of {list(DOMAINS)}")
    labels = obj.get("labels") or []
    if not isinstance(labels, list) or not all(isinstance(v, str) and v for v in labels):
        raise fail("labels", f"expected a list of non-empty strings, got {labels!r}")
    answer = obj.get("answer") or ()
    if isinstance(answer, str):
        answer = tuple(a.strip() for a in answer.split(",") if a.strip())
    # the record's own checks (placeholders, paths, types), with a stand-in label set that is dropped again
    probe = dict(obj, labels=list(labels) or ["?"], answer=(list(labels) or ["?"])[:1],
                 domain=obj["domain"] if obj["domain"] in DOMAINS else DOMAINS[0])
    checked = Record.from_json(probe, base_dir=base_dir, where=where)
    return replace(checked, answer=tuple(answer), labels=tuple(labels), domain=obj["domain"])


__all__ = ["UNSPECIFIED", "PredictInput", "file_record", "guess_kind", "read_unlabelled", "unlabelled_record"]
