"""Evaluation and logging callbacks: clinical metrics (torchmetrics), report folders, JSONL traces, and the
per-domain statistics feedback from the RL system to the data module."""

from qoq.callbacks.checkpoint import RunCheckpoint
from qoq.callbacks.evaluation import ClinicalMetricsCallback
from qoq.callbacks.feedback import DomainStatsFeedback
from qoq.callbacks.predictions import PredictionWriter
from qoq.callbacks.progress import RunProgress
from qoq.callbacks.metrics import (
    ClinicalMetrics,
    EvalRecord,
    label_space_from_records,
    merge_label_spaces,
)
from qoq.callbacks.report import write_report
from qoq.callbacks.traces import RolloutTraceWriter, record_to_json, write_traces

__all__ = [
    "ClinicalMetrics",
    "ClinicalMetricsCallback",
    "DomainStatsFeedback",
    "EvalRecord",
    "PredictionWriter",
    "RolloutTraceWriter",
    "RunCheckpoint",
    "RunProgress",
    "label_space_from_records",
    "merge_label_spaces",
    "record_to_json",
    "write_report",
    "write_traces",
]
