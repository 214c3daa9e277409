"""ClinicalMetricsCallback and RolloutTraceWriter inside tiny Lightning runs (a dummy module)."""

import json
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from qoq.callbacks import ClinicalMetrics, ClinicalMetricsCallback, RolloutTraceWriter
from qoq.testing import quiet_trainer


class EvalRecordsModule(L.LightningModule):
    """Returns the hand-built records of the batch's indices; keeps a rollout trace every step."""

    def __init__(self, records):
        super().__init__()
        self.records = records
        self.layer = torch.nn.Linear(1, 1)
        self.last_rollout_trace = None

    def training_step(self, batch, batch_idx):
        self.last_rollout_trace = [{"prompt_id": f"p{i}", "reward": float("nan")} for i in batch.tolist()]
        return self.layer(batch.float()[:, None]).sum()

    def validation_step(self, batch, batch_idx):
        return {"eval_records": [self.records[i] for i in batch.tolist()]}

    def test_step(self, batch, batch_idx):
        return {"eval_records": [self.records[i] for i in batch.tolist()]}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, callbacks, max_steps=-1, **kwargs):
    return quiet_trainer(max_steps, devices=1, default_root_dir=tmp_path, callbacks=callbacks, **kwargs)


def _loader(n):
    return DataLoader(range(n), batch_size=5)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*(num_workers|does not have many workers|sync_dist).*")
        yield


def test_test_run_logs_and_reports(tmp_path, records, label_space):
    callback = ClinicalMetricsCallback(
        label_space=label_space, report_dir=str(tmp_path / "reports"), generation="greedy"
    )
    (logged,) = _trainer(tmp_path, [callback]).test(
        EvalRecordsModule(records), dataloaders=_loader(len(records))
    )
    expected = ClinicalMetrics.from_records(records, split="test").compute()
    assert logged["test/macro_f1/overall"] == pytest.approx(expected["test/macro_f1/overall"])
    assert logged["test/balanced_accuracy/worst_domain"] == pytest.approx(
        expected["test/balanced_accuracy/worst_domain"]
    )
    assert logged["test/iou/chest/cxr"] == pytest.approx(0.25)
    assert logged.keys() == expected.keys()
    report = tmp_path / "reports" / "test-step0"
    assert callback.last_report == report
    assert len((report / "traces.jsonl").read_text().splitlines()) == len(records)
    assert "generation: greedy" in (report / "summary.md").read_text()


def test_validate_infers_the_label_space(tmp_path, records):
    module = EvalRecordsModule(records)
    module.eval_sampling = type("Params", (), {"temperature": 0.0, "max_new_tokens": 8})()
    callback = ClinicalMetricsCallback()  # no label space: taken from the records at epoch end
    (logged,) = _trainer(tmp_path, [callback]).validate(module, dataloaders=_loader(len(records)))
    expected = ClinicalMetrics.from_records(records, split="val").compute()
    assert logged == pytest.approx(expected)
    summary = (tmp_path / "reports" / "val-step0" / "summary.md").read_text()
    assert "generation: greedy, max_new_tokens=8" in summary


def test_fit_logs_validation_and_writes_rollout_traces(tmp_path, records, label_space):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "rollouts.jsonl").write_text('{"from": "an earlier run"}\n')  # a fresh fit replaces it
    metrics_cb = ClinicalMetricsCallback(label_space=label_space, report_every_validation=True)
    traces_cb = RolloutTraceWriter(every_n_steps=2, max_rows=2, dirpath=str(tmp_path / "traces"))
    trainer = _trainer(
        tmp_path, [metrics_cb, traces_cb], max_steps=5, limit_train_batches=3, num_sanity_val_steps=1
    )
    trainer.fit(
        EvalRecordsModule(records), train_dataloaders=_loader(15), val_dataloaders=_loader(len(records))
    )
    expected = ClinicalMetrics.from_records(records, split="val").compute()
    assert float(trainer.callback_metrics["val/macro_f1/overall"]) == pytest.approx(
        expected["val/macro_f1/overall"]
    )
    assert metrics_cb.results["val"] == pytest.approx(expected)
    # a report per real validation (end of epoch 0; max_steps ends epoch 1 first), none for the sanity check
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["val-step3"]
    rows = [json.loads(line) for line in (tmp_path / "traces" / "rollouts.jsonl").read_text().splitlines()]
    # optimizer steps 1..5 after each batch; written at 1, 3, 5, two rows each
    assert [r["global_step"] for r in rows] == [1, 1, 3, 3, 5, 5]
    assert rows[0] == {"global_step": 1, "prompt_id": "p0", "reward": None}


def test_fit_writes_no_report_by_default(tmp_path, records, label_space):
    trainer = _trainer(tmp_path, [ClinicalMetricsCallback(label_space)], max_steps=2, limit_train_batches=2)
    trainer.fit(
        EvalRecordsModule(records), train_dataloaders=_loader(10), val_dataloaders=_loader(len(records))
    )
    assert "val/macro_f1/overall" in trainer.callback_metrics
    assert not (tmp_path / "reports").exists()


def test_step_output_contract_is_checked(tmp_path, records, label_space):
    class NoRecords(EvalRecordsModule):
        def test_step(self, batch, batch_idx):
            return torch.zeros(())

    with pytest.raises(TypeError, match="NoRecords's test_step must return a dict with 'eval_records'"):
        _trainer(tmp_path, [ClinicalMetricsCallback(label_space)]).test(
            NoRecords(records), _loader(len(records))
        )
