"""The clinical domain vocabulary: the nine domains of QoQ-Med and the datasets known in each.

QoQ-Med trained on CLIMB's nine clinical domains. Each known dataset carries its closed label set, so
accuracy and macro-F1 are well defined over it. Users bring these datasets themselves (qoq ships
importers for their public formats, see :mod:`qoq.data.importers`); the embedded demo set
(:mod:`qoq.data.demo`) defines its own small datasets with the labels that its sources honestly carry.

``DOMAINS`` is also the domain vocabulary of every data module: ``domain_ids`` index this tuple, so ids
stay identical across runs, manifests and checkpoints whatever domains a run happens to contain.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The nine clinical domains, in the order that defines ``PromptBatch.domain_ids``.
#: ``chest_xray`` stands for projection radiography as a whole (the demo set also puts a tibia
#: radiograph there); ``ct`` and ``mri`` hold 2-D slices and 3-D volumes; ``ultrasound`` stills and cines.
DOMAINS: tuple[str, ...] = (
    "chest_xray",
    "mammography",
    "dermoscopy",
    "ct",
    "fundus",
    "ultrasound",
    "mri",
    "pathology",
    "ecg",
)

#: The 14 CheXpert observations (multi-label; "No Finding" when none applies).
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: ECG diagnostic superclasses used by QoQ-Med (PTB-XL's five plus AFib and a catch-all).
ECG_LABELS: tuple[str, ...] = ("normal", "CD", "MI", "STTC", "AFib", "HYP", "other")

#: International clinical diabetic retinopathy grades (importers map other gradings onto these).
DR_GRADES: tuple[str, ...] = ("No DR", "Mild", "Moderate", "Severe", "Proliferative DR")

BIRADS: tuple[str, ...] = tuple(f"BI-RADS {k}" for k in range(6))
BENIGN_MALIGNANT: tuple[str, ...] = ("benign", "malignant")
SKIN_LESIONS: tuple[str, ...] = ("melanoma", "nevus", "BCC", "AKIEC", "other")


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset QoQ-Med trained on, with the closed label set qoq scores it against.

    Attributes:
        name: dataset name as it appears in manifests' ``dataset`` field.
        domain: one of :data:`DOMAINS`.
        labels: the closed label set.
        multi_label: whether a record may carry several labels.
        train_size: approximate number of QA pairs in QoQ-Med's training mix (0 when not reported).
    """

    name: str
    domain: str
    labels: tuple[str, ...]
    multi_label: bool = False
    train_size: int = 0


@dataclass(frozen=True)
class DomainInfo:
    """One clinical domain.

    Attributes:
        name: one of :data:`DOMAINS`.
        title: human-readable name.
        modality: placeholder kind its records mostly use: "image", "video" (cines, 3-D volumes) or "ecg".
        datasets: the known datasets of the domain.
    """

    name: str
    title: str
    modality: str
    datasets: tuple[DatasetInfo, ...]

    @property
    def labels(self) -> tuple[str, ...]:
        """The union of the datasets' label sets, in first-seen order."""
        return tuple(dict.fromkeys(label for d in self.datasets for label in d.labels))


def _d(name: str, domain: str, labels: tuple[str, ...], size: int, multi: bool = False) -> DatasetInfo:
    return DatasetInfo(name, domain, labels, multi, size)


#: Per-domain known datasets (sizes: QoQ-Med / CLIMB training QA pairs, rounded).
DOMAIN_INFO: dict[str, DomainInfo] = {
    info.name: info
    for info in (
        DomainInfo(
            "chest_xray",
            "Chest X-ray",
            "image",
            (
                _d("MIMIC-CXR", "chest_xray", CHEXPERT_LABELS, 349_000, multi=True),
                _d("CheXpert", "chest_xray", CHEXPERT_LABELS, 212_000, multi=True),
                _d("VinDr-CXR", "chest_xray", CHEXPERT_LABELS, 15_000, multi=True),
                _d("COVID-19", "chest_xray", ("COVID-19", "Pneumonia", "No Finding"), 2_000),
                _d("CoronaHack", "chest_xray", ("Pneumonia", "No Finding"), 5_000),
            ),
        ),
        DomainInfo(
            "mammography",
            "Mammography",
            "image",
            (
                _d("VinDr-Mammo", "mammography", BIRADS, 16_000),
                _d("CBIS-DDSM", "mammography", BENIGN_MALIGNANT, 2_200),
                _d("CMMD", "mammography", BENIGN_MALIGNANT, 1_400),
            ),
        ),
        DomainInfo(
            "dermoscopy",
            "Dermoscopy",
            "image",
            (
                _d("ISIC-2020", "dermoscopy", BENIGN_MALIGNANT, 27_000),
                _d("HAM10000", "dermoscopy", SKIN_LESIONS, 8_000),
                _d("PAD-UFES-20", "dermoscopy", SKIN_LESIONS, 1_800),
            ),
        ),
        DomainInfo(
            "ct",
            "CT (3-D)",
            "video",
            (
                _d("RSPECT", "ct", ("no PE", "PE"), 1_340_000),
                _d("INSPECT", "ct", ("no PE", "PE"), 17_000),
                _d("LNDb", "ct", ("nodule >= 3 mm", "nodule < 3 mm", "non-nodule"), 4_000),
                _d(
                    "Hemorrhage",
                    "ct",
                    ("none", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"),
                    2_000,
                    multi=True,
                ),
                _d("KiTS23", "ct", BENIGN_MALIGNANT, 400),
            ),
        ),
        DomainInfo(
            "fundus",
            "Fundus photography",
            "image",
            (
                _d("Jichi", "fundus", DR_GRADES, 8_000),
                _d("APTOS", "fundus", DR_GRADES, 2_900),
                _d("Messidor-2", "fundus", DR_GRADES, 1_400),
            ),
        ),
        DomainInfo(
            "ultrasound",
            "Ultrasound",
            "image",
            (
                _d("BUSI", "ultrasound", ("normal", "benign", "malignant"), 600),
                _d("COVID-BLUES", "ultrasound", ("COVID-19", "no COVID-19"), 300),
                _d("COVID-US", "ultrasound", ("COVID-19", "pneumonia", "normal", "other"), 70),
            ),
        ),
        DomainInfo(
            "mri",
            "MRI",
            "image",
            (
                _d("Brain Tumor", "mri", ("glioma", "meningioma", "pituitary", "no tumor"), 2_900),
                _d("Brain Tumor 2", "mri", ("tumor", "no tumor"), 200),
            ),
        ),
        DomainInfo(
            "pathology",
            "Pathology",
            "image",
            (
                _d(
                    "LC25000",
                    "pathology",
                    (
                        "lung adenocarcinoma",
                        "lung squamous cell carcinoma",
                        "lung benign tissue",
                        "colon adenocarcinoma",
                        "colon benign tissue",
                    ),
                    15_000,
                ),
                _d("BCSS", "pathology", ("tumor", "stroma", "inflammatory", "necrosis", "other"), 4_200),
            ),
        ),
        DomainInfo(
            "ecg",
            "ECG",
            "ecg",
            (
                _d("PTB-XL", "ecg", ECG_LABELS, 17_000, multi=True),
                _d("Chapman-Shaoxing", "ecg", ECG_LABELS, 38_000, multi=True),
                _d("Georgia", "ecg", ECG_LABELS, 19_000, multi=True),
                _d("CPSC", "ecg", ECG_LABELS, 4_800, multi=True),
            ),
        ),
    )
}


def check_domain(domain: str) -> str:
    """Return ``domain`` if it is one of :data:`DOMAINS`, else raise a ValueError listing them."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown clinical domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    return domain


def domain_index(domain: str) -> int:
    """Index of ``domain`` in :data:`DOMAINS` (the stable ``domain_ids`` value)."""
    return DOMAINS.index(check_domain(domain))


def known_dataset(name: str) -> DatasetInfo | None:
    """The known dataset called ``name`` (case-insensitive), or None."""
    key = name.casefold()
    for info in DOMAIN_INFO.values():
        for dataset in info.datasets:
            if dataset.name.casefold() == key:
                return dataset
    return None
