"""Protected health information (PHI): which DICOM tags identify a patient, and a check for leaks.

The rule qoq follows:

1. Loaders (:mod:`qoq.data.loaders`) parse only the DICOM attributes they need to decode pixels,
   order a series or decode a waveform (their allow-lists ``DICOM_PIXEL_TAGS``, ``DICOM_SERIES_TAGS``
   and ``DICOM_WAVEFORM_TAGS``, which share nothing with :data:`PHI_TAGS`), and return arrays: no
   header string leaves a loader, and none is logged.
2. Manifests hold only :class:`~qoq.data.records.Record` fields; importers fill them from dataset
   tables without patient ids, names, ages, sexes or dates (file paths stay paths: CheXpert's contain
   ``patientNNNNN`` folder names, which are dataset-assigned pseudonyms, not identifiers).
3. Converted files (e.g. :func:`~qoq.data.loaders.write_wfdb`) carry signal, lead names and rate only.

:func:`assert_no_phi` is the test-side check: plant identifying values in a copy of a real DICOM, run
it through the pipeline, and scan every output file and captured log for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: DICOM attributes that identify (or help identify) a patient, a visit or a clinician (after the
#: DICOM PS3.15 basic confidentiality profile; not exhaustive).
PHI_TAGS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthName", "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientIDsSequence",
    "OtherPatientNames", "PatientAddress", "PatientTelephoneNumbers", "MedicalRecordLocator",
    "MilitaryRank", "EthnicGroup", "PatientComments", "ResponsiblePerson",
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "PhysiciansOfRecord",
    "RequestingPhysician", "OperatorsName", "AccessionNumber", "StudyID", "StationName",
    "DeviceSerialNumber", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "AcquisitionDateTime", "StudyTime", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
)  # fmt: skip


def phi_values(ds: Any) -> list[str]:
    """The non-empty :data:`PHI_TAGS` values of a pydicom dataset, as strings.

    Args:
        ds: a ``pydicom.Dataset``.

    Returns:
        The values (sequence-valued tags are skipped).
    """
    out = []
    for keyword in PHI_TAGS:
        value = ds.get(keyword)
        if value is None or keyword.endswith("Sequence"):
            continue
        text = str(value).strip()
        if text:
            out.append(text)
    return out


def _needles(values: Iterable[str]) -> set[str]:
    """Each value, plus the parts of a person name (``Doe^Jane`` -> ``Doe``, ``Jane``, ``Jane Doe``)."""
    out: set[str] = set()
    for value in values:
        value = str(value).strip()
        if not value:
            continue
        out.add(value)
        if "^" in value:
            parts = [p for p in value.split("^") if p]
            out.update(p for p in parts if len(p) >= 3)
            out.add(" ".join(reversed(parts[:2])))
    return out


def assert_no_phi(texts_or_files: Iterable[str | os.PathLike[str]], ds_values: Any) -> None:
    """Fail if any identifying value appears in the given texts or files.

    Args:
        texts_or_files: strings (searched as text, e.g. captured logs) and paths (``Path`` objects;
            files are searched as bytes, folders recursively).
        ds_values: the identifying values to look for: an iterable of strings, or a pydicom dataset
            (its :func:`phi_values`). Person names are also searched by their parts.

    Raises:
        AssertionError: naming the value and where it was found.
        ValueError: if there is nothing to look for (a check that cannot fail).
    """
    values = phi_values(ds_values) if hasattr(ds_values, "dir") else list(ds_values)
    needles = _needles(values)
    if not needles:
        raise ValueError("no identifying values to look for")
    encoded = {n: n.encode("utf-8") for n in needles}
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            path = Path(item)
            files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
            for file in files:
                data = file.read_bytes()
                for needle, raw in encoded.items():
                    if raw in data:
                        raise AssertionError(f"identifying value {needle!r} found in file {file}")
        else:
            for needle in needles:
                if needle in item:
                    raise AssertionError(f"identifying value {needle!r} found in text: {item[:200]!r}")
