"""qoq's clinical data layer: records and manifests, modality loaders, importers, the demo set, data modules.

Public names are importable from ``qoq.data`` directly; each is loaded on first use, so
``import qoq.data`` stays cheap (the data modules pull in Lightning only when asked for).

- records and manifests: :class:`Record`, :func:`read_manifest`, :func:`write_manifest`, :func:`import_climb`
- domains: :data:`DOMAINS`, :data:`DOMAIN_INFO`, :class:`DomainInfo`, :class:`DatasetInfo`
- loaders and transforms: :func:`read_image`, :func:`read_frames`, :func:`read_ecg`, :class:`ECGSpec`,
  :func:`write_wfdb`, :func:`resize_image`, :func:`scale_boxes`, :func:`resize_mask`, :func:`load_mask`,
  :func:`frames_to_tensor`
- errors: :class:`DataError`, :class:`SkipCounter`
- importers: :func:`import_dataset`, :func:`label_counts`
- the demo set: :func:`build_demo`; synthetic images: :func:`synthetic_mammogram`, :func:`synthetic_dermoscopy`
- loading and batching: :class:`ClinicalDataset`, :func:`collate`, :func:`prompt_text`, :func:`reference_response`
- data modules: :class:`ClinicalDataModule`, :class:`MultiDomainDataModule`, one per domain
  (:class:`ChestXrayDataModule`, ...), :class:`MixtureSampler`, :func:`split_records`
- adaptive sampling: :class:`AdaptiveDomainSampler`, :class:`AdaptiveSampling`, :class:`AdaptiveSchedule`,
  :func:`allocate_group_sizes`
- the ``qoq data`` command: :func:`qoq.data.command.main`
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any

_EXPORTS = MappingProxyType(
    {
        "records": ("Record",),
        "manifest": ("read_manifest", "write_manifest", "import_climb"),
        "domains": (
            "DOMAINS",
            "DOMAIN_INFO",
            "DomainInfo",
            "DatasetInfo",
            "CHEXPERT_LABELS",
            "ECG_LABELS",
            "known_dataset",
            "domain_index",
        ),
        "loaders": ("read_image", "read_frames", "read_ecg", "ECGSpec", "write_wfdb"),
        "transforms": (
            "resize_image",
            "scale_boxes",
            "resize_mask",
            "load_mask",
            "frames_to_tensor",
            "mask_box",
        ),
        "errors": ("DataError", "SkipCounter"),
        "importers": ("import_dataset", "label_counts", "IMPORTERS"),
        "demo": ("build_demo",),
        "synthetic": ("synthetic_mammogram", "synthetic_dermoscopy", "MAMMO_LABELS", "DERMOSCOPY_LABELS"),
        "dataset": ("ClinicalDataset", "Sample", "collate", "prompt_text", "reference_response"),
        "datamodules": (
            "ClinicalDataModule",
            "MultiDomainDataModule",
            "ChestXrayDataModule",
            "MammographyDataModule",
            "DermoscopyDataModule",
            "CTDataModule",
            "FundusDataModule",
            "UltrasoundDataModule",
            "MRIDataModule",
            "PathologyDataModule",
            "ECGDataModule",
            "MixtureSampler",
            "split_records",
        ),
        "adaptive": ("AdaptiveDomainSampler", "AdaptiveSampling", "AdaptiveSchedule", "allocate_group_sizes"),
    }
)
_MODULE_OF = MappingProxyType({name: module for module, names in _EXPORTS.items() for name in names})

__all__ = list(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'qoq.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"qoq.data.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
