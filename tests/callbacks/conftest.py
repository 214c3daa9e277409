"""Hand-built evaluation records shared by the callback tests (expected values in test_clinical_metrics)."""

import pytest

from qoq.callbacks.metrics import EvalRecord

CXR = ("effusion", "edema", "nodule")  # multi-label; "nodule" never in gold, never predicted
COVID = ("covid", "normal")  # single-label
PTBXL = ("normal", "mi", "afib")  # single-label; the ECG domain's only dataset

LABEL_SPACE = {"chest": {"cxr": list(CXR), "covid": list(COVID)}, "ecg": {"ptbxl": list(PTBXL)}}


def rec(i, domain, dataset, labels, gold, predicted, origin="real", iou=None):
    """A record whose response boxes its prediction."""
    return EvalRecord(
        id=f"{dataset}-{i}",
        domain=domain,
        dataset=dataset,
        origin=origin,
        labels=labels,
        gold=frozenset(gold),
        response=f"<think>...</think> \\boxed{{{', '.join(sorted(predicted))}}}",
        predicted=frozenset(predicted),
        pred_boxes=[(1, 2, 3, 4)] if iou else [],
        gold_boxes=[(1, 2, 3, 5)] if iou is not None else [],
        rewards={
            "accuracy": 1.0 if set(gold) == set(predicted) else 0.0,
            "iou": float("nan") if iou is None else iou,
        },
        iou=iou,
    )


def build_records():
    """12 records: 10 real (3 cxr, 4 covid, 3 ptbxl) and 2 synthetic (ptbxl)."""
    return [
        # chest / cxr, multi-label; IoU annotated on records 0 and 2 only
        rec(0, "chest", "cxr", CXR, {"effusion", "edema"}, {"effusion"}, iou=0.5),
        rec(1, "chest", "cxr", CXR, {"edema"}, {"edema", "effusion"}),
        rec(2, "chest", "cxr", CXR, {"effusion"}, {"effusion"}, iou=0.0),
        # chest / covid, single-label; record 1 gives no answer
        rec(0, "chest", "covid", COVID, {"covid"}, {"covid"}),
        rec(1, "chest", "covid", COVID, {"normal"}, set()),
        rec(2, "chest", "covid", COVID, {"normal"}, {"normal"}),
        rec(3, "chest", "covid", COVID, {"covid"}, {"normal"}),
        # ecg / ptbxl, single-label; "normal" is never predicted on real records
        rec(0, "ecg", "ptbxl", PTBXL, {"mi"}, {"mi"}),
        rec(1, "ecg", "ptbxl", PTBXL, {"afib"}, {"afib"}),
        rec(2, "ecg", "ptbxl", PTBXL, {"normal"}, {"mi"}),
        # synthetic: must not move any real score
        rec(3, "ecg", "ptbxl", PTBXL, {"normal"}, {"normal"}, origin="synthetic", iou=1.0),
        rec(4, "ecg", "ptbxl", PTBXL, {"afib"}, {"afib"}, origin="synthetic"),
    ]


@pytest.fixture
def records():
    """The hand-built records (fresh list per test)."""
    return build_records()


@pytest.fixture
def label_space():
    """The label space the records cover."""
    return {domain: {k: list(v) for k, v in ds.items()} for domain, ds in LABEL_SPACE.items()}
