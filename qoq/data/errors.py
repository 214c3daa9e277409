"""Bad clinical input: one error type that names the file, line and field, and a counter for skips.

Every reader in :mod:`qoq.data` raises :class:`DataError` for input it cannot use (never a blank image
or a zero ECG in its place). A caller that prefers to drop bad records passes a :class:`SkipCounter`,
which counts the skips per machine-readable ``reason`` so a run can report what it left out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from os import PathLike


class DataError(ValueError):
    """Input that qoq cannot use, located as precisely as the reader knows.

    The message reads ``"<path>:<line>: field '<field>': <detail>"``, leaving out the parts that are
    unknown, e.g. ``manifest.jsonl:12: field 'answer': 'pneumonia' is not in the label set [...]``.

    Args:
        reason: short machine key, e.g. ``"malformed_json"``, ``"missing_file"``, ``"unreadable_file"``,
            ``"corrupt_dicom"``, ``"ecg_shape"``, ``"answer_not_in_labels"``, ``"empty_manifest"``,
            ``"missing_field"``, ``"bad_field"``.
        detail: what is wrong, for a person.
        path: the file at fault (a manifest, an image, an ECG record), or None.
        line: 1-based line in ``path`` (manifests), or None.
        field: the record field at fault, or None.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        path: str | PathLike[str] | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.path = None if path is None else str(path)
        self.line = line
        self.field = field
        super().__init__(self._message())

    def _message(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where = f"{where}:{self.line}"
        parts = [where] if where else []
        if self.field is not None:
            parts.append(f"field '{self.field}'")
        parts.append(self.detail)
        return ": ".join(parts)

    def located(self, path: str | PathLike[str], line: int | None = None) -> DataError:
        """The same error placed in ``path`` (and ``line``), e.g. a record error inside its manifest.

        Args:
            path: the file the error was found in.
            line: 1-based line in that file, or None.

        Returns:
            A new :class:`DataError` with the same reason, detail and field.
        """
        return DataError(self.reason, self.detail, path=path, line=line, field=self.field)

    def __reduce__(self):  # keep pickling (DataLoader workers) working with keyword-only arguments
        return _rebuild, (self.reason, self.detail, self.path, self.line, self.field)


def _rebuild(reason: str, detail: str, path: str | None, line: int | None, field: str | None) -> DataError:
    return DataError(reason, detail, path=path, line=line, field=field)


@dataclass
class SkipCounter:
    """Counts records skipped for bad input, per :attr:`DataError.reason`.

    Attributes:
        counts: reason -> number of skipped records.
        examples: reason -> the message of the first skip with that reason.
        skipped: one entry per skip: ``file``, ``line``, ``field``, ``reason``, ``detail`` (what a run
            folder's ``skipped.jsonl`` holds).
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    skipped: list[dict[str, str | int | None]] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        """Count one skip.

        Args:
            error: the error that caused it.
        """
        self.counts[error.reason] += 1
        self.examples.setdefault(error.reason, str(error))
        self.skipped.append(
            {"file": error.path, "line": error.line, "field": error.field, "reason": error.reason, "detail": error.detail}
        )

    @property
    def total(self) -> int:
        """All skips, over every reason."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        """Reason -> count, most frequent first."""
        return dict(self.counts.most_common())

    def report(self) -> str:
        """A short text: the total, then one line per reason with its first example."""
        if not self.counts:
            return "skipped 0 records"
        lines = [f"skipped {self.total} record(s):"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason}: {n} (first: {self.examples[reason]})")
        return "\n".join(lines)
