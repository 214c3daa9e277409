"""Reading and writing manifests (JSONL of :class:`~qoq.data.records.Record`), and CLIMB's own form.

A manifest is one JSON object per line with exactly the record's fields; paths in it are relative to
the manifest's folder (absolute paths are kept as they are). Blank lines are ignored.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from qoq.data.errors import DataError, SkipCounter
from qoq.data.loaders import ECGSpec, read_ecg, read_frames, read_image
from qoq.data.records import PATH_FIELDS, Record
from qoq.data.transforms import load_mask
from qoq.types import PLACEHOLDERS

log = logging.getLogger(__name__)


def read_manifest(
    path: str | os.PathLike[str],
    *,
    skip_invalid: bool = False,
    check_files: bool | Literal["load"] = True,
    counter: SkipCounter | None = None,
    ecg_spec: ECGSpec | None = None,
) -> list[Record]:
    """Read and validate a JSONL manifest.

    Args:
        path: the manifest file.
        skip_invalid: False (default) fails on the first bad line; True drops bad lines, counts them in
            ``counter`` per reason and logs one warning per skip.
        check_files: True checks that every referenced file exists (``"missing_file"``); ``"load"``
            also decodes each one with its loader (see :func:`verify_files`), so corrupt files are
            caught per line; False checks nothing.
        counter: where skips are counted (a fresh one is used when None).
        ecg_spec: the ECG form checked with ``check_files="load"`` (default :class:`ECGSpec`).

    Returns:
        The records, in file order.

    Raises:
        DataError: ``"missing_file"`` if the manifest does not exist; for a bad line (when not
            skipping) the record's error located at ``path:line``; ``"duplicate_id"`` for a repeated id;
            ``"empty_manifest"`` if no valid record remains.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("missing_file", "manifest not found", path=path)
    counter = counter if counter is not None else SkipCounter()
    records: list[Record] = []
    seen: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(
            "unreadable_file", f"cannot read manifest ({err.__class__.__name__})", path=path
        ) from None
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = _parse_line(text, path)
            if check_files:
                verify_files(record, load=check_files == "load", ecg_spec=ecg_spec)
            if record.id in seen:
                raise DataError(
                    "duplicate_id", f"id {record.id!r} already used on line {seen[record.id]}", field="id"
                )
            seen[record.id] = lineno
            records.append(record)
        except DataError as err:
            err = err.located(path, lineno)
            if not skip_invalid:
                raise err from None
            counter.add(err)
            log.warning("skipping %s", err)
    if not records:
        detail = "no records" if not counter.total else f"no valid records ({counter.report()})"
        raise DataError("empty_manifest", detail, path=path)
    return records


def _parse_line(text: str, path: Path) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError("malformed_json", f"invalid JSON: {err.msg} (column {err.colno})") from None
    return Record.from_json(obj, base_dir=path.parent, where=str(path))


def verify_files(record: Record, *, load: bool = False, ecg_spec: ECGSpec | None = None) -> None:
    """Check that a record's files exist and, with ``load``, that their loaders accept them.

    Loading reads each image, the first frame of each video, each ECG in ``ecg_spec``'s form and the
    mask: a full decode, so use it to vet a manifest, not on every epoch.

    Args:
        record: the record.
        load: also decode every file.
        ecg_spec: the ECG form to check against (default :class:`ECGSpec`).

    Raises:
        DataError: the loader's reason, with the record field and the file in the message (no path or
            line of its own: :func:`read_manifest` places it at the manifest line).
    """
    spec = ecg_spec or ECGSpec()
    load_fn = {
        "images": read_image,
        "videos": lambda f: read_frames(f, 1),
        "time_series": lambda f: read_ecg(f, spec),
        "segmentation_path": load_mask,
    }
    for fld, file in record.files():
        if not (
            os.path.exists(file) or os.path.exists(file + ".hea")
        ):  # a WFDB record may be named by its stem
            raise DataError("missing_file", f"file not found: {file}", field=fld)
        if load:
            try:
                load_fn[fld](file)
            except DataError as err:
                raise DataError(err.reason, f"{err.detail} [{err.path or file}]", field=fld) from None


def write_manifest(records: Iterable[Record], path: str | os.PathLike[str]) -> Path:
    """Write records as a JSONL manifest, with paths relative to the manifest's folder.

    Only the record's fields are written (no DICOM header or other metadata can leak through), and the
    file is replaced atomically.

    Args:
        records: the records to write.
        path: the manifest file; its folder is created if needed.

    Returns:
        The manifest path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record.to_json(relative_to=path.parent), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def import_climb(
    path: str | os.PathLike[str],
    *,
    domain: str | None = None,
    dataset: str | None = None,
    labels: Sequence[str] | None = None,
    origin: str = "real",
) -> list[Record]:
    """Convert a file in CLIMB's conversation form into records.

    CLIMB's converter writes a JSON list (or JSONL) of
    ``{"images": [...], "videos": [...], "time-series": [...], "conversations": [{"from": "human",
    "value": question}, {"from": "gpt", "value": answer}]}``; paths are relative to the file's folder.

    What the released QoQ-Med code left implicit is made explicit here:

    - ``domain`` / ``dataset``: taken from the arguments; otherwise, like the released code, from the
      first two components of the first image/video path (``<domain>/<dataset>/...``); an ECG-only
      entry gets domain ``"ecg"`` and its own ``"dataset"`` key. An entry with neither raises.
    - ``labels``: taken from the argument; otherwise inferred per (domain, dataset) as every answer
      label seen in the file (so only as complete as the file is).
    - placeholders: the released code prepended ``<image>`` when a prompt had none and always added
      the ECG token; here a modality whose placeholder is absent gets one placeholder per item
      prepended, and any other count mismatch is an error.

    Args:
        path: the CLIMB JSON or JSONL file.
        domain: domain of every entry, or None to infer it.
        dataset: dataset of every entry, or None to infer it.
        labels: closed label set of every entry, or None to infer it.
        origin: "real" or "synthetic".

    Returns:
        The validated records (ids: the entry's ``id`` if any, else ``<file stem>-<index>``).

    Raises:
        DataError: located at the file and entry (1-based) at fault.
    """
    path = Path(path)
    entries = _read_climb(path)
    drafts: list[tuple[int, dict[str, Any]]] = []
    for index, entry in enumerate(entries, start=1):
        try:
            drafts.append((index, _climb_draft(entry, index, path, domain, dataset, origin)))
        except DataError as err:
            raise err.located(path, index) from None
    label_sets: dict[tuple[str, str], list[str]] = {}
    for _, draft in drafts:
        seen = label_sets.setdefault((draft["domain"], draft["dataset"]), [])
        for lab in draft["answer"].split(","):
            lab = lab.strip()
            if lab and lab.casefold() not in {s.casefold() for s in seen}:
                seen.append(lab)
    records = []
    for index, draft in drafts:
        inferred = sorted(label_sets[(draft["domain"], draft["dataset"])], key=str.casefold)
        draft["labels"] = list(labels) if labels is not None else inferred
        try:
            records.append(Record.from_json(draft, base_dir=path.parent, where=str(path)))
        except DataError as err:
            raise err.located(path, index) from None
    if not records:
        raise DataError("empty_manifest", "no entries", path=path)
    return records


def _read_climb(path: Path) -> list[Any]:
    if not path.is_file():
        raise DataError("missing_file", "CLIMB file not found", path=path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(
                        "malformed_json", f"invalid JSON: {err.msg}", path=path, line=lineno
                    ) from None
    return data if isinstance(data, list) else [data]


def _climb_draft(
    entry: Any, index: int, path: Path, domain: str | None, dataset: str | None, origin: str
) -> dict:
    if not isinstance(entry, dict):
        raise DataError("bad_record", f"expected a JSON object, got {type(entry).__name__}")
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise DataError("missing_field", "expected a 'conversations' list", field="conversations")
    question = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    answer = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(question, str) or not isinstance(answer, str):
        raise DataError(
            "missing_field", "needs a 'human' and a 'gpt' turn with string values", field="conversations"
        )
    items = {
        "images": entry.get("images") or [],
        "videos": entry.get("videos") or [],
        "time_series": entry.get("time-series") or entry.get("time_series") or [],
    }
    vision = items["images"] or items["videos"]
    parts = Path(vision[0]).parts if vision and isinstance(vision[0], str) else ()
    if domain is None:
        domain = parts[0] if len(parts) > 2 else ("ecg" if items["time_series"] else None)
    if dataset is None:
        dataset = parts[1] if len(parts) > 2 else entry.get("dataset")
    if not domain or not dataset:
        raise DataError(
            "missing_field", "cannot infer domain/dataset: pass them as arguments", field="domain"
        )
    placeholder = {
        "images": PLACEHOLDERS["image"],
        "videos": PLACEHOLDERS["video"],
        "time_series": PLACEHOLDERS["ecg"],
    }
    for key in PATH_FIELDS:
        if items[key] and placeholder[key] not in question:
            question = " ".join([placeholder[key]] * len(items[key])) + " " + question
    return {
        "id": str(entry.get("id", f"{path.stem}-{index}")),
        "problem": question,
        "answer": answer.strip(),
        "domain": domain,
        "dataset": dataset,
        **items,
        "bbox": entry.get("bbox") or [],
        "segmentation_path": entry.get("segmentation_path") or None,
        "origin": origin,
        "label_source": "CLIMB",
        "source": {"path": path.name},
    }
