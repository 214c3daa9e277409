"""Clinical evaluation metrics (ALGORITHMS.md section 5) as one torchmetrics ``Metric``.

Per dataset, over its closed label set, every label is scored one-vs-rest from its TP / FP / FN / TN
counts over the evaluated samples:

- ``macro_f1``          mean over labels of F1 = 2 TP / (2 TP + FP + FN);
- ``balanced_accuracy`` mean over labels of recall = TP / (TP + FN);
- ``ovr_accuracy``      mean over labels of (TP + TN) / N: the paper's "accuracy", reported for
  comparability only: true negatives inflate it (a model that never answers scores (L - 1) / L on a
  single-label dataset of L labels). Reports name it "ovr_accuracy (paper)".
- ``iou``               mean over the box/mask-annotated samples of the best predicted box's IoU.

A label whose denominator is zero (for F1: never in the gold sets and never predicted; for recall:
never in the gold sets) is scored 0 and kept in the mean by default, as torchmetrics and scikit-learn
do with ``zero_division=0`` over an explicit label list; ``undefined_labels="skip"`` leaves such labels
out of the mean instead. Either way no NaN is produced. A label that is in the gold sets but never
predicted has F1 0 and recall 0 under both settings.

Multi-label datasets count each label independently. A single-label sample whose predicted set is empty
("no answer") counts as negative for every label (a false negative for its gold label).

Aggregation: a domain's score is the unweighted mean over its datasets, ``overall`` the unweighted mean
over domains, ``worst_domain`` the minimum over domains; only datasets and domains with samples count.
Synthetic-origin samples never enter the plain names, which are computed on real samples only; the
same scores over all samples (real and synthetic) carry the suffix ``_with_synthetic``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

#: Origins an :class:`EvalRecord` may carry; the index is the origin axis of the metric states.
ORIGINS: tuple[str, ...] = ("real", "synthetic")
#: The per-dataset scores, in report order.
SCORES: tuple[str, ...] = ("macro_f1", "balanced_accuracy", "ovr_accuracy", "iou")
#: Suffix of the scores computed over all samples (real and synthetic).
WITH_SYNTHETIC = "_with_synthetic"
#: Extra predicted columns of a single-label confusion matrix, after the dataset's labels.
CONFUSION_EXTRA_COLUMNS: tuple[str, ...] = ("(no answer)", "(several)")
#: Names a domain may not take: they are aggregate keys in :meth:`ClinicalMetrics.compute`.
RESERVED_DOMAINS: frozenset[str] = frozenset({"overall", "worst_domain"})

LabelSpace = Mapping[str, Mapping[str, Sequence[str]]]
"""domain -> dataset -> the dataset's closed label set."""

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class EvalRecord:
    """One evaluated sample: what the policy answered and how it scored.

    Built by the LightningModule's ``validation_step`` / ``test_step`` (returned as
    ``{"eval_records": [...]}``); ``predicted`` must come from :func:`qoq.rl.rewards.extract_answer`,
    the extractor the training reward uses. Records carry no patient identifiers and must not be given
    any (they are written verbatim to ``traces.jsonl``). Masks are not kept (memory): the IoU against a
    mask is computed by the module and stored in ``iou``.

    Attributes:
        id: the prompt's record id.
        domain: clinical domain.
        dataset: dataset name within the domain.
        origin: "real" or "synthetic".
        labels: the dataset's closed label set.
        gold: ground-truth label set (a subset of ``labels``).
        response: the generated response text.
        predicted: the extracted answer (a subset of ``labels``; empty when there is no answer).
        pred_boxes: boxes parsed from the response, ``x1, y1, x2, y2`` pixels of the seen image.
        gold_boxes: ground-truth boxes in the same frame (empty when none or when only a mask exists).
        rewards: reward components of this response (e.g. accuracy, iou, format, total); NaN where a
            term does not apply.
        iou: best predicted box's IoU with the ground truth, in [0, 1]; None when the sample has no
            box/mask annotation (0.0 when it has one and no box was predicted).
    """

    id: str
    domain: str
    dataset: str
    origin: str
    labels: tuple[str, ...]
    gold: frozenset[str]
    response: str
    predicted: frozenset[str]
    pred_boxes: tuple[Box, ...] = ()
    gold_boxes: tuple[Box, ...] = ()
    rewards: dict[str, float] = field(default_factory=dict)
    iou: float | None = None

    def __post_init__(self) -> None:
        # Normalise container types (callers pass lists and sets), then validate.
        for name, kind in (("labels", tuple), ("gold", frozenset), ("predicted", frozenset)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        for name in ("pred_boxes", "gold_boxes"):
            object.__setattr__(self, name, tuple(tuple(float(x) for x in b) for b in getattr(self, name)))
        where = f"EvalRecord {self.id!r} ({self.domain}/{self.dataset})"
        if self.origin not in ORIGINS:
            raise ValueError(f"{where}: origin must be one of {ORIGINS}, got {self.origin!r}")
        if not self.labels:
            raise ValueError(f"{where}: empty label set")
        for name in ("gold", "predicted"):
            outside = getattr(self, name) - set(self.labels)
            if outside:
                raise ValueError(
                    f"{where}: {name} labels {sorted(outside)} are not in its label set {self.labels}"
                )
        if any(len(b) != 4 for b in self.pred_boxes + self.gold_boxes):
            raise ValueError(f"{where}: boxes must have 4 coordinates (x1, y1, x2, y2)")
        if self.iou is not None:
            if not -1e-6 <= self.iou <= 1.0 + 1e-6:  # NaN fails too
                raise ValueError(f"{where}: iou must be in [0, 1] or None, got {self.iou!r}")
            object.__setattr__(self, "iou", min(max(float(self.iou), 0.0), 1.0))


def label_space_from_records(records: Iterable[EvalRecord]) -> dict[str, dict[str, tuple[str, ...]]]:
    """The label space (domain -> dataset -> labels) that ``records`` cover, in first-seen order.

    Args:
        records: evaluated samples.

    Returns:
        The label space; each dataset's labels are taken from its records' closed label set.

    Raises:
        ValueError: if two records of one dataset disagree on its label set.
    """
    space: dict[str, dict[str, tuple[str, ...]]] = {}
    for r in records:
        known = space.setdefault(r.domain, {}).setdefault(r.dataset, r.labels)
        if set(known) != set(r.labels):
            raise ValueError(
                f"EvalRecord {r.id!r}: dataset {r.domain}/{r.dataset} has label set {r.labels}, "
                f"but an earlier record of it has {known}"
            )
    return space


def merge_label_spaces(spaces: Iterable[LabelSpace]) -> dict[str, dict[str, tuple[str, ...]]]:
    """Union of label spaces (e.g. those seen on each data-parallel rank), in first-seen order.

    Args:
        spaces: label spaces to merge.

    Returns:
        The merged label space.

    Raises:
        ValueError: if a dataset has different label sets in two spaces.
    """
    merged: dict[str, dict[str, tuple[str, ...]]] = {}
    for space in spaces:
        for domain, datasets in space.items():
            for dataset, labels in datasets.items():
                known = merged.setdefault(domain, {}).setdefault(dataset, tuple(labels))
                if set(known) != set(labels):
                    raise ValueError(f"dataset {domain}/{dataset} has label sets {known} and {tuple(labels)}")
    return merged


class ClinicalMetrics(Metric):
    """Per-dataset / per-domain macro-F1, balanced accuracy, one-vs-rest accuracy and IoU.

    See the module docstring for the definitions. States are count tensors over a fixed label space
    (all reduced by sum, except the max gold-set size per dataset), so they merge exactly across
    data-parallel ranks (torchmetrics syncs them in :meth:`compute`) and with :meth:`merge_state`.
    The label space must therefore be the same on every rank: give it at construction (or build it
    with :func:`label_space_from_records` / :func:`merge_label_spaces`).

    Args:
        label_space: domain -> dataset -> the dataset's closed label set.
        split: prefix of the names :meth:`compute` returns (e.g. "val", "test").
        undefined_labels: how a label whose metric has a zero denominator enters a mean: "zero" scores
            it 0 (torchmetrics / scikit-learn ``zero_division=0``), "skip" leaves it out.
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        label_space: LabelSpace,
        split: str = "val",
        undefined_labels: Literal["zero", "skip"] = "zero",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not split or "/" in split:
            raise ValueError(f"split must be a non-empty name without '/', got {split!r}")
        if undefined_labels not in ("zero", "skip"):
            raise ValueError(f"undefined_labels must be 'zero' or 'skip', got {undefined_labels!r}")
        self.split = split
        self.undefined_labels = undefined_labels
        self.datasets: list[tuple[str, str]] = []  # (domain, dataset), in state order
        self.labels: list[tuple[str, ...]] = []  # per dataset
        for domain, datasets in label_space.items():
            if not domain or "/" in domain or domain in RESERVED_DOMAINS:
                raise ValueError(
                    f"invalid domain name {domain!r} (non-empty, no '/', not {sorted(RESERVED_DOMAINS)})"
                )
            for dataset, labels in datasets.items():
                labels = tuple(labels)
                if not dataset or "/" in dataset:
                    raise ValueError(f"invalid dataset name {dataset!r} in domain {domain!r}")
                if not labels or len(set(labels)) != len(labels):
                    raise ValueError(
                        f"dataset {domain}/{dataset}: label set must be non-empty and unique: {labels}"
                    )
                self.datasets.append((domain, dataset))
                self.labels.append(labels)
        if not self.datasets:
            raise ValueError("empty label space")
        self._index = {key: d for d, key in enumerate(self.datasets)}
        # Flat layout: dataset d owns labels [label_offset[d], + L_d) and confusion cells
        # [pair_offset[d], + L_d * (L_d + 2)).
        sizes = [len(x) for x in self.labels]
        self._label_offset = [sum(sizes[:d]) for d in range(len(sizes))]
        self._pair_offset = [sum(s * (s + 2) for s in sizes[:d]) for d in range(len(sizes))]
        n_labels, n_pairs = sum(sizes), sum(s * (s + 2) for s in sizes)
        n_sets, n_orig = len(sizes), len(ORIGINS)

        # [origin, (TP, FP, FN, TN), flat label]
        self.add_state("stats", torch.zeros(n_orig, 4, n_labels, dtype=torch.long), dist_reduce_fx="sum")
        # single-label confusion counts, per dataset a [L, L + 2] block (gold x predicted), flattened
        self.add_state("pairs", torch.zeros(n_orig, n_pairs, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros(n_orig, n_sets, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("max_gold", torch.zeros(n_sets, dtype=torch.long), dist_reduce_fx="max")
        self.add_state("iou_sum", torch.zeros(n_orig, n_sets, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("iou_count", torch.zeros(n_orig, n_sets, dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def from_records(cls, records: Sequence[EvalRecord], split: str = "val", **kwargs) -> ClinicalMetrics:
        """A metric over the label space ``records`` cover, already updated with them.

        Args:
            records: evaluated samples.
            split: prefix of the computed names.
            **kwargs: further constructor arguments.

        Returns:
            The updated metric.
        """
        metric = cls(label_space_from_records(records), split=split, **kwargs)
        metric.update(records)
        return metric

    # ------------------------------------------------------------------ update
    def update(self, records: Sequence[EvalRecord]) -> None:
        """Count a batch of evaluated samples.

        Args:
            records: evaluated samples; each one's dataset must be in the label space.
        """
        if not records:
            return
        n_labels = self.stats.shape[-1]
        gold = torch.zeros(len(records), n_labels, dtype=torch.bool)  # [N, labels]
        pred = torch.zeros(len(records), n_labels, dtype=torch.bool)  # [N, labels]
        member = torch.zeros(len(records), n_labels, dtype=torch.bool)  # [N, labels] the record's dataset
        sets, origins, pair_index, pair_origin, gold_sizes = [], [], [], [], []
        for row, r in enumerate(records):
            d = self._dataset_index(r)
            labels = self.labels[d]
            pos = {label: i for i, label in enumerate(labels)}
            off = self._label_offset[d]
            member[row, off : off + len(labels)] = True
            gold[row, [off + pos[x] for x in r.gold]] = True
            pred[row, [off + pos[x] for x in r.predicted]] = True
            sets.append(d)
            origins.append(ORIGINS.index(r.origin))
            gold_sizes.append(len(r.gold))
            if len(r.gold) == 1:  # a single-label sample: one confusion cell
                (g,) = r.gold
                n = len(r.predicted)
                col = pos[next(iter(r.predicted))] if n == 1 else len(labels) + (0 if n == 0 else 1)
                pair_index.append(self._pair_offset[d] + pos[g] * (len(labels) + 2) + col)
                pair_origin.append(origins[-1])
        dev = self.stats.device
        sets_t = torch.tensor(sets, device=dev)  # [N]
        origin_t = torch.tensor(origins, device=dev)  # [N]
        gold, pred, member = gold.to(dev), pred.to(dev), member.to(dev)
        counts = torch.stack(
            [gold & pred, ~gold & pred, gold & ~pred, member & ~gold & ~pred], 1
        )  # [N, 4, labels]
        self.stats.index_add_(0, origin_t, counts.long())
        ones = torch.ones(len(records), dtype=torch.long, device=dev)
        self.samples.index_put_((origin_t, sets_t), ones, accumulate=True)
        self.max_gold.scatter_reduce_(0, sets_t, torch.tensor(gold_sizes, device=dev), "amax")
        if pair_index:
            index = (torch.tensor(pair_origin, device=dev), torch.tensor(pair_index, device=dev))
            self.pairs.index_put_(
                index, torch.ones(len(pair_index), dtype=torch.long, device=dev), accumulate=True
            )
        annotated = [row for row, r in enumerate(records) if r.iou is not None]
        if annotated:
            values = torch.tensor([records[row].iou for row in annotated], dtype=torch.float64, device=dev)
            index = (origin_t[annotated], sets_t[annotated])
            self.iou_sum.index_put_(index, values, accumulate=True)
            self.iou_count.index_put_(index, torch.ones_like(index[0]), accumulate=True)

    def _dataset_index(self, record: EvalRecord) -> int:
        d = self._index.get((record.domain, record.dataset))
        if d is None:
            known = ", ".join(f"{a}/{b}" for a, b in self.datasets)
            raise ValueError(
                f"EvalRecord {record.id!r}: dataset {record.domain}/{record.dataset} is not in the metric's "
                f"label space ({known})"
            )
        if set(record.labels) != set(self.labels[d]):
            raise ValueError(
                f"EvalRecord {record.id!r}: label set {record.labels} differs from the metric's label set "
                f"{self.labels[d]} for {record.domain}/{record.dataset}"
            )
        return d

    # ------------------------------------------------------------------ compute
    def compute(self) -> dict[str, float]:
        """All scores, synced across data-parallel ranks (a collective: call it on every rank).

        Returns:
            ``{split}/{metric}/{domain}/{dataset}``, ``{split}/{metric}/{domain}``,
            ``{split}/{metric}/overall`` and ``{split}/{metric}/worst_domain`` for each metric of
            :data:`SCORES` over real samples, the same with ``{metric}_with_synthetic`` over all samples
            (only when synthetic samples were seen), and the sample counts ``{split}/n_real/...`` and
            ``{split}/n_synthetic/...`` (per dataset, per domain, overall). Datasets and domains without
            samples, and IoU where no sample is annotated, are left out.
        """
        stats = self.stats.cpu()  # [origin, 4, labels]
        samples = self.samples.cpu()  # [origin, D]
        iou_sum, iou_count = self.iou_sum.cpu(), self.iou_count.cpu()  # [origin, D]
        out: dict[str, float] = {}
        subsets = [("", [0])]
        if int(samples[1].sum()) > 0:
            subsets.append((WITH_SYNTHETIC, [0, 1]))
        for suffix, origins in subsets:
            per_dataset = self._dataset_scores(
                stats[origins].sum(0),
                samples[origins].sum(0),
                iou_sum[origins].sum(0),
                iou_count[origins].sum(0),
            )
            out.update(self._aggregate(per_dataset, suffix))
        for o, origin in enumerate(ORIGINS):
            counts = {
                key: float(samples[o, d]) for d, key in enumerate(self.datasets) if samples[:, d].sum() > 0
            }
            for (domain, dataset), n in counts.items():
                out[f"{self.split}/n_{origin}/{domain}/{dataset}"] = n
            for domain in dict.fromkeys(domain for domain, _ in counts):
                out[f"{self.split}/n_{origin}/{domain}"] = sum(
                    n for (dm, _), n in counts.items() if dm == domain
                )
            out[f"{self.split}/n_{origin}/overall"] = float(samples[o].sum())
        return out

    def _dataset_scores(
        self, stats: Tensor, samples: Tensor, iou_sum: Tensor, iou_count: Tensor
    ) -> dict[tuple[str, str], dict[str, float]]:
        """Per-dataset scores from summed states: stats [4, labels], the others [D]."""
        scores = {}
        for d, key in enumerate(self.datasets):
            n = int(samples[d])
            if n == 0:
                continue
            per_label = self._label_table(stats, d, n)
            row = {
                "macro_f1": self._mean(per_label["f1"], per_label["f1_defined"]),
                "balanced_accuracy": self._mean(per_label["recall"], per_label["recall_defined"]),
                "ovr_accuracy": float(per_label["ovr_accuracy"].mean()),
            }
            if int(iou_count[d]) > 0:
                row["iou"] = float(iou_sum[d] / iou_count[d])
            scores[key] = row
        return scores

    def _label_table(self, stats: Tensor, d: int, n: int) -> dict[str, Tensor]:
        """Per-label F1, recall and one-vs-rest accuracy of dataset ``d`` (each [L], float64)."""
        off, size = self._label_offset[d], len(self.labels[d])
        tp, fp, fn, tn = stats[:, off : off + size].double()  # each [L]
        f1_den, rec_den = 2 * tp + fp + fn, tp + fn
        return {
            "f1": torch.where(f1_den > 0, 2 * tp / f1_den.clamp_min(1), 0.0),
            "recall": torch.where(rec_den > 0, tp / rec_den.clamp_min(1), 0.0),
            "ovr_accuracy": (tp + tn) / n,
            "f1_defined": f1_den > 0,
            "recall_defined": rec_den > 0,
            "support": tp + fn,
            "predicted": tp + fp,
        }

    def _mean(self, values: Tensor, defined: Tensor) -> float:
        if self.undefined_labels == "skip":
            values = values[defined]
        return float(values.mean()) if len(values) else 0.0

    def _aggregate(
        self, per_dataset: dict[tuple[str, str], dict[str, float]], suffix: str
    ) -> dict[str, float]:
        """Dataset -> domain (unweighted mean) -> overall (unweighted mean) and worst domain."""
        out = {}
        for metric in SCORES:
            name = f"{self.split}/{metric}{suffix}"
            by_domain: dict[str, list[float]] = {}
            for (domain, dataset), row in per_dataset.items():
                if metric in row:
                    out[f"{name}/{domain}/{dataset}"] = row[metric]
                    by_domain.setdefault(domain, []).append(row[metric])
            domain_scores = {domain: sum(v) / len(v) for domain, v in by_domain.items()}
            for domain, value in domain_scores.items():
                out[f"{name}/{domain}"] = value
            if domain_scores:
                out[f"{name}/overall"] = sum(domain_scores.values()) / len(domain_scores)
                out[f"{name}/worst_domain"] = min(domain_scores.values())
        return out

    # ------------------------------------------------------------------ tables
    def is_multi_label(self, dataset: str, domain: str | None = None) -> bool:
        """Whether any evaluated gold set of ``dataset`` had several labels (synced; a collective).

        Args:
            dataset: dataset name.
            domain: its domain; needed only when the name occurs in several domains.
        """
        d = self._find(dataset, domain)
        with self._synced():
            return int(self.max_gold[d]) > 1

    def confusion(
        self, dataset: str, domain: str | None = None, origin: Literal["real", "synthetic", "all"] = "all"
    ) -> tuple[list[str], Tensor]:
        """Count table of one dataset (synced across ranks; a collective: call it on every rank).

        Args:
            dataset: dataset name.
            domain: its domain; needed only when the name occurs in several domains.
            origin: which samples to count.

        Returns:
            ``(labels, matrix)``. Single-label dataset: ``matrix`` is ``[L, L + 2]`` long, rows the gold
            label, columns the predicted label, then "(no answer)" (empty prediction) and "(several)"
            (more than one label predicted), see :data:`CONFUSION_EXTRA_COLUMNS`. Multi-label dataset
            (a gold set with several labels was seen): ``matrix`` is ``[L, 2, 2]`` long, per label
            ``[[TN, FP], [FN, TP]]`` (scikit-learn's ``multilabel_confusion_matrix`` layout).
        """
        d = self._find(dataset, domain)
        rows = [0, 1] if origin == "all" else [ORIGINS.index(origin)]
        labels, size = list(self.labels[d]), len(self.labels[d])
        with self._synced():
            if int(self.max_gold[d]) > 1:
                off = self._label_offset[d]
                tp, fp, fn, tn = self.stats[rows].sum(0)[:, off : off + size].cpu()  # each [L]
                return labels, torch.stack(
                    [torch.stack([tn, fp], -1), torch.stack([fn, tp], -1)], 1
                )  # [L, 2, 2]
            off = self._pair_offset[d]
            return labels, self.pairs[rows].sum(0)[off : off + size * (size + 2)].cpu().view(size, size + 2)

    def label_scores(
        self, dataset: str, domain: str | None = None, origin: Literal["real", "synthetic", "all"] = "all"
    ) -> dict[str, dict[str, float]]:
        """Per-label scores of one dataset (synced across ranks; a collective: call it on every rank).

        Args:
            dataset: dataset name.
            domain: its domain; needed only when the name occurs in several domains.
            origin: which samples to count.

        Returns:
            label -> {"f1", "recall", "ovr_accuracy", "support" (gold count), "predicted" (count)};
            empty when the dataset has no samples of that origin.
        """
        d = self._find(dataset, domain)
        rows = [0, 1] if origin == "all" else [ORIGINS.index(origin)]
        with self._synced():
            n = int(self.samples[rows, d].sum())
            if n == 0:
                return {}
            table = self._label_table(self.stats[rows].sum(0).cpu(), d, n)
        keys = ("f1", "recall", "ovr_accuracy", "support", "predicted")
        return {label: {k: float(table[k][i]) for k in keys} for i, label in enumerate(self.labels[d])}

    def _find(self, dataset: str, domain: str | None) -> int:
        hits = [d for d, (dm, ds) in enumerate(self.datasets) if ds == dataset and domain in (None, dm)]
        if len(hits) != 1:
            where = f"{domain}/{dataset}" if domain else dataset
            problem = "is not in the label space" if not hits else "is ambiguous: give its domain"
            raise KeyError(f"dataset {where} {problem}")
        return hits[0]

    def _synced(self):
        """Context in which the states are summed over ranks (as in :meth:`compute`)."""
        return self.sync_context(
            dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
        )


__all__ = [
    "CONFUSION_EXTRA_COLUMNS",
    "ORIGINS",
    "SCORES",
    "WITH_SYNTHETIC",
    "ClinicalMetrics",
    "EvalRecord",
    "LabelSpace",
    "label_space_from_records",
    "merge_label_spaces",
]
