"""ClinicalMetrics on hand-built records (conftest.build_records), values computed by hand below."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from qoq.callbacks.evaluation import _all_gather_objects
from qoq.callbacks.metrics import ClinicalMetrics, EvalRecord, label_space_from_records, merge_label_spaces

# chest / cxr (multi-label, 3 real records):
#   effusion  r0 TP, r1 FP, r2 TP            TP2 FP1 FN0 TN0  F1 4/5  recall 1    acc 2/3
#   edema     r0 FN, r1 TP, r2 TN            TP1 FP0 FN1 TN1  F1 2/3  recall 1/2  acc 2/3
#   nodule    never gold, never predicted    TN3              F1 0    recall 0    acc 1   (undefined -> 0)
CXR_F1 = (4 / 5 + 2 / 3 + 0) / 3  # 0.48889
CXR_BA = (1 + 1 / 2 + 0) / 3  # 0.5
CXR_ACC = (2 / 3 + 2 / 3 + 1) / 3  # 7/9
# chest / covid (single-label, 4 real records; r1 answers nothing):
#   covid   r0 TP, r3 FN, r1 r2 TN           TP1 FP0 FN1 TN2  F1 2/3  recall 1/2  acc 3/4
#   normal  r2 TP, r3 FP, r1 FN, r0 TN       TP1 FP1 FN1 TN1  F1 1/2  recall 1/2  acc 1/2
COVID_F1, COVID_BA, COVID_ACC = (2 / 3 + 1 / 2) / 2, 1 / 2, (3 / 4 + 1 / 2) / 2
# ecg / ptbxl (single-label, the domain's only dataset; 3 real records):
#   normal  never predicted: r2 FN, TN2      F1 0    recall 0  acc 2/3
#   mi      r0 TP, r2 FP, r1 TN              F1 2/3  recall 1  acc 2/3
#   afib    r1 TP, TN2                       F1 1    recall 1  acc 1
ECG_F1, ECG_BA, ECG_ACC = (0 + 2 / 3 + 1) / 3, (0 + 1 + 1) / 3, (2 / 3 + 2 / 3 + 1) / 3
CHEST_F1, CHEST_BA, CHEST_ACC = (CXR_F1 + COVID_F1) / 2, (CXR_BA + COVID_BA) / 2, (CXR_ACC + COVID_ACC) / 2
# with the 2 synthetic ptbxl records (normal -> normal, afib -> afib), N = 5:
#   normal TP1 FN1 TN3  F1 2/3  recall 1/2  acc 4/5
#   mi     TP1 FP1 TN3  F1 2/3  recall 1    acc 4/5
#   afib   TP2 TN3      F1 1    recall 1    acc 1
ECG_ALL_F1, ECG_ALL_BA, ECG_ALL_ACC = (2 / 3 + 2 / 3 + 1) / 3, (1 / 2 + 1 + 1) / 3, (4 / 5 + 4 / 5 + 1) / 3


def test_scores_by_hand(records):
    out = ClinicalMetrics.from_records(records, split="test").compute()
    expected = {
        "test/macro_f1/chest/cxr": CXR_F1,
        "test/balanced_accuracy/chest/cxr": CXR_BA,
        "test/ovr_accuracy/chest/cxr": CXR_ACC,
        "test/macro_f1/chest/covid": COVID_F1,
        "test/balanced_accuracy/chest/covid": COVID_BA,
        "test/ovr_accuracy/chest/covid": COVID_ACC,
        "test/macro_f1/chest": CHEST_F1,  # 0.53611
        "test/balanced_accuracy/chest": CHEST_BA,  # 0.5
        "test/ovr_accuracy/chest": CHEST_ACC,
        "test/macro_f1/ecg/ptbxl": ECG_F1,
        "test/macro_f1/ecg": ECG_F1,  # a one-dataset domain is its dataset
        "test/balanced_accuracy/ecg": ECG_BA,
        "test/ovr_accuracy/ecg": ECG_ACC,
        "test/macro_f1/overall": (CHEST_F1 + ECG_F1) / 2,  # 0.54583: domains weigh equally
        "test/macro_f1/worst_domain": CHEST_F1,
        "test/balanced_accuracy/overall": (CHEST_BA + ECG_BA) / 2,
        "test/balanced_accuracy/worst_domain": CHEST_BA,
        "test/ovr_accuracy/overall": (CHEST_ACC + ECG_ACC) / 2,
        # IoU: cxr r0 0.5 and r2 0.0 annotated, r1 not: (0.5 + 0) / 2, not / 3
        "test/iou/chest/cxr": 0.25,
        "test/iou/chest": 0.25,
        "test/iou/overall": 0.25,
        "test/n_real/overall": 10,
        "test/n_real/chest": 7,
        "test/n_synthetic/overall": 2,
        "test/n_synthetic/ecg/ptbxl": 2,
        "test/n_synthetic/chest": 0,
    }
    for name, value in expected.items():
        assert out[name] == pytest.approx(value), name
    # no IoU where nothing (real) is annotated
    assert "test/iou/ecg" not in out and "test/iou/chest/covid" not in out


def test_synthetic_only_in_with_synthetic_names(records):
    out = ClinicalMetrics.from_records(records, split="test").compute()
    real_only = ClinicalMetrics.from_records(
        [r for r in records if r.origin == "real"], split="test"
    ).compute()
    for name, value in real_only.items():
        if "/n_" not in name:
            assert out[name] == value, name  # the synthetic records move no real score
    assert not any("_with_synthetic" in name for name in real_only)
    assert out["test/macro_f1_with_synthetic/ecg/ptbxl"] == pytest.approx(ECG_ALL_F1)
    assert out["test/balanced_accuracy_with_synthetic/ecg"] == pytest.approx(ECG_ALL_BA)
    assert out["test/ovr_accuracy_with_synthetic/ecg"] == pytest.approx(ECG_ALL_ACC)
    assert out["test/macro_f1_with_synthetic/overall"] == pytest.approx((CHEST_F1 + ECG_ALL_F1) / 2)
    # synthetic ptbxl record 3 is annotated with IoU 1.0: ecg gets an IoU only with synthetic
    assert out["test/iou_with_synthetic/ecg"] == pytest.approx(1.0)
    assert out["test/iou_with_synthetic/overall"] == pytest.approx((0.25 + 1.0) / 2)
    assert out["test/iou_with_synthetic/worst_domain"] == pytest.approx(0.25)


def test_undefined_labels_skip(records):
    out = ClinicalMetrics.from_records(records, split="val", undefined_labels="skip").compute()
    # cxr "nodule" (no gold, no prediction) leaves both means; ptbxl "normal" has gold support: still counted
    assert out["val/macro_f1/chest/cxr"] == pytest.approx((4 / 5 + 2 / 3) / 2)
    assert out["val/balanced_accuracy/chest/cxr"] == pytest.approx((1 + 1 / 2) / 2)
    assert out["val/macro_f1/ecg/ptbxl"] == pytest.approx(ECG_F1)


def test_label_only_predicted_counts_against_f1_but_not_recall_when_skipping():
    # one single-label dataset, labels (a, b): gold a, predicted b.
    # a: FN1 -> F1 0, recall 0;  b: FP1 -> F1 0 (defined: 2*0+1+0 > 0), recall undefined (no gold b)
    r = EvalRecord("0", "d", "s", "real", ("a", "b"), {"a"}, "", {"b"})
    zero = ClinicalMetrics.from_records([r]).compute()
    skip = ClinicalMetrics.from_records([r], undefined_labels="skip").compute()
    assert zero["val/macro_f1/d/s"] == 0.0 and skip["val/macro_f1/d/s"] == 0.0
    assert zero["val/balanced_accuracy/d/s"] == 0.0 and skip["val/balanced_accuracy/d/s"] == 0.0
    assert zero["val/ovr_accuracy/d/s"] == 0.0  # a: FN, b: FP -> (0 + 0) / 2


def test_confusion_tables(records):
    m = ClinicalMetrics.from_records(records)
    labels, matrix = m.confusion("covid")
    assert labels == ["covid", "normal"]
    # columns: covid, normal, (no answer), (several)
    assert matrix.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]
    labels, matrix = m.confusion("ptbxl", origin="real")
    assert matrix.tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]
    assert m.confusion("ptbxl", origin="synthetic")[1].tolist() == [
        [1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0],
    ]
    assert m.is_multi_label("cxr") and not m.is_multi_label("covid", domain="chest")
    labels, matrix = m.confusion("cxr")  # per label [[TN, FP], [FN, TP]]
    assert labels == ["effusion", "edema", "nodule"]
    assert matrix.tolist() == [[[0, 1], [0, 2]], [[1, 0], [1, 1]], [[3, 0], [0, 0]]]
    scores = m.label_scores("cxr")
    assert scores["effusion"]["f1"] == pytest.approx(0.8) and scores["nodule"]["support"] == 0
    with pytest.raises(KeyError, match="not in the label space"):
        m.confusion("mimic")


def test_merge_state_equals_one_pass(records, label_space):
    whole = ClinicalMetrics(label_space)
    whole.update(records)
    first, second = ClinicalMetrics(label_space), ClinicalMetrics(label_space)
    first.update(records[::2])
    second.update(records[1::2])
    first.merge_state(second)
    for name in ("stats", "pairs", "samples", "max_gold", "iou_sum", "iou_count"):
        assert torch.equal(getattr(first, name), getattr(whole, name)), name
    assert first.compute() == whole.compute()


def test_empty_and_reset(label_space, records):
    m = ClinicalMetrics(label_space)
    m.update([])
    assert m.compute() == {"val/n_real/overall": 0.0, "val/n_synthetic/overall": 0.0}
    m.update(records)
    m.reset()
    m.update(records[:1])
    assert m.compute()["val/n_real/overall"] == 1.0


def test_bad_input_is_named(label_space, records):
    with pytest.raises(ValueError, match="'x'.*origin"):
        EvalRecord("x", "d", "s", "made-up", ("a",), {"a"}, "", set())
    with pytest.raises(ValueError, match=r"'x'.*predicted labels \['z'\]"):
        EvalRecord("x", "d", "s", "real", ("a",), {"a"}, "", {"z"})
    with pytest.raises(ValueError, match="iou"):
        EvalRecord("x", "d", "s", "real", ("a",), {"a"}, "", set(), iou=1.5)
    m = ClinicalMetrics(label_space)
    with pytest.raises(ValueError, match="'y'.*chest/mimic is not in"):
        m.update([EvalRecord("y", "chest", "mimic", "real", ("a",), {"a"}, "", set())])
    with pytest.raises(ValueError, match="'y'.*label set"):
        m.update([EvalRecord("y", "chest", "covid", "real", ("covid", "flu"), {"flu"}, "", set())])
    with pytest.raises(ValueError, match="domain name"):
        ClinicalMetrics({"overall": {"s": ["a"]}})
    with pytest.raises(ValueError, match="label sets"):
        merge_label_spaces([{"d": {"s": ["a"]}}, {"d": {"s": ["a", "b"]}}])
    assert label_space_from_records(records) == {
        k: {d: tuple(v) for d, v in ds.items()} for k, ds in label_space.items()
    }


# ---------------------------------------------------------------------------------------- 2 ranks (gloo)
def _rank(rank: int, world: int, port: int, label_space, parts, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        metric = ClinicalMetrics(label_space, split="test")
        metric.update(parts[rank])
        out = metric.compute()  # synced
        local_n = int(metric.samples.sum())  # unsynced again after compute
        confusion = metric.confusion("covid")[1].tolist()
        spaces = _all_gather_objects(label_space_from_records(parts[rank]))
        gathered = [r.id for part in _all_gather_objects(parts[rank]) for r in part]
        queue.put((rank, out, local_n, confusion, merge_label_spaces(spaces), gathered))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_sync_to_the_single_process_result(records, label_space):
    parts = [records[:5], records[5:]]  # rank 0 sees no ecg, rank 1 little chest
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: no re-import in the children (spawn costs ~20 s of imports here); but a process group made by an
    # earlier test's in-process vLLM engine would be inherited, and a process can initialize only one
    ctx = mp.get_context("spawn" if torch.distributed.is_initialized() else "fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, label_space, parts, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = ClinicalMetrics(label_space, split="test")
    single.update(records)
    for rank, out, local_n, confusion, space, gathered in results:
        assert out == pytest.approx(single.compute()), rank
        assert local_n == len(parts[rank])
        assert confusion == single.confusion("covid")[1].tolist()
        assert space == label_space_from_records(records)
        assert gathered == [r.id for r in records]
