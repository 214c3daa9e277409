"""LightningDataModules over clinical records: one per domain, and the multi-domain mixture.

:class:`ClinicalDataModule` reads manifests and/or the embedded demo set, holds out a validation split,
and serves training batches from a seeded mixture stream:

- **sampling** (:class:`MixtureSampler`): each slot of a batch picks a domain with probability
  ``p_d`` (``natural``: proportional to its record count n_d; ``balanced``: uniform over domains;
  ``temperature``: proportional to ``n_d ** (1 / T)``; ``adaptive``: one of those, tilted each step toward
  the domains the RL system reports as needing samples, see below), then a record of that domain
  uniformly, with replacement. Batch ``b`` of stream epoch ``e`` is a pure function of ``(seed, e, b)``
  (and, in ``adaptive`` mode, of the reports).
- **adaptive sampling** (``sampler: adaptive``, settings :class:`~qoq.data.adaptive.AdaptiveSampling`):
  after each RL step :class:`~qoq.callbacks.DomainStatsFeedback` hands the step's per-domain statistics
  (share of zero-variance groups, mean reward) to :meth:`ClinicalDataModule.observe_domain_stats`; an
  :class:`~qoq.data.adaptive.AdaptiveSchedule` turns them into the probabilities batch ``b`` is drawn
  with (those after the report of batch ``b - lag``), saved with the stream position.
- **extra batches**: :meth:`ClinicalDataModule.extra_batch` draws more prompts for the batch being
  trained on (DAPO-style dynamic sampling), a pure function of ``(seed, stream index, draw)``.
- **exact resume**: the stream is numbered; each :class:`~qoq.types.PromptBatch` carries its
  ``stream_index`` and :meth:`ClinicalDataModule.on_after_batch_transfer` (called when the trainer
  takes the batch, not when a worker prefetches it) records it. :meth:`~ClinicalDataModule.state_dict`
  (saved in Lightning checkpoints) holds the next index, so a resumed run continues with exactly the
  batch that would have come next. The stream's epochs are its own (``steps_per_epoch`` batches each)
  and need not line up with the trainer's when ``limit_train_batches`` cuts an epoch short.
- **domain ids**: ``domain_vocab`` is always the full :data:`~qoq.data.domains.DOMAINS` tuple, so a
  domain has the same id in every run, manifest and checkpoint (DRPO's statistics are keyed by it).

Validation and test both iterate the held-out split in order, unless ``val_manifests`` /
``test_manifests`` name sets of their own (then ``qoq test`` reads only those: the training records are
not needed). ``predict`` (:class:`~qoq.data.predict.PredictInput`) names what ``qoq predict`` runs on:
unlabelled manifests, or one file and a question. The per-domain modules
(:class:`ChestXrayDataModule`, ...) are the same module with the domain filter fixed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qoq.console import verbose
from qoq.data.adaptive import AdaptiveSampling, AdaptiveSchedule
from qoq.data.dataset import ClinicalDataset, collate
from qoq.data.domains import DOMAINS, check_domain
from qoq.data.errors import SkipCounter
from qoq.data.loaders import ECGSpec
from qoq.data.manifest import read_manifest
from qoq.data.predict import UNSPECIFIED, PredictInput
from qoq.data.records import Record
from qoq.rl.rewards import RESPONSE_FORMAT
from qoq.seeds import derive_seed
from qoq.types import PromptBatch

SamplerMode = Literal["natural", "balanced", "temperature", "adaptive"]
BaseMode = Literal["natural", "balanced", "temperature"]


def default_demo_dir() -> Path:
    """``$QOQ_CACHE/demo``, with ``QOQ_CACHE`` defaulting to ``~/.cache/qoq``."""
    return Path(os.environ.get("QOQ_CACHE", "~/.cache/qoq")).expanduser() / "demo"


def _id_hash(record_id: str) -> int:
    return int.from_bytes(hashlib.sha1(record_id.encode("utf-8")).digest()[:8], "big")


def split_records(records: Sequence[Record], val_fraction: float) -> tuple[list[Record], list[Record]]:
    """Hold out ``val_fraction`` of each domain's records, chosen by the hash of their ids.

    Deterministic and independent of record order and seed. A domain with n >= 2 records gives
    ``clip(round(n * val_fraction), 1, n - 1)`` of them to validation (when ``val_fraction > 0``), so
    every such domain appears on both sides; a single record stays in training.

    Args:
        records: all records.
        val_fraction: share held out per domain, in ``[0, 1)``.

    Returns:
        ``(train, val)``, each in the input order.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_domain: dict[str, list[Record]] = {}
    for record in records:
        by_domain.setdefault(record.domain, []).append(record)
    held: set[str] = set()
    for group in by_domain.values():
        n = len(group)
        if val_fraction == 0.0 or n < 2:
            continue
        k = min(n - 1, max(1, round(n * val_fraction)))
        held.update(r.id for r in sorted(group, key=lambda r: (_id_hash(r.id), r.id))[:k])
    return [r for r in records if r.id not in held], [r for r in records if r.id in held]


class MixtureSampler:
    """Seeded training batches mixed across domains.

    Args:
        domains: the domain of each training record (index i -> record i).
        batch_size: records per batch on this process.
        mode: ``natural`` (p_d proportional to n_d), ``balanced`` (uniform over domains) or
            ``temperature`` (p_d proportional to n_d ** (1 / temperature)); the default probabilities,
            which :meth:`batch` can override per batch.
        temperature: T of the ``temperature`` mode (1 = natural, large = balanced).
        seed: the seed; batch b of epoch e depends on ``(seed, e, b)`` only.
        rank: this process's index in data-parallel training.
        world_size: number of data-parallel processes; each draws the same global batch of
            ``batch_size * world_size`` records and takes its slice.
    """

    def __init__(
        self,
        domains: Sequence[str],
        batch_size: int,
        mode: BaseMode = "natural",
        temperature: float = 2.0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not domains:
            raise ValueError("MixtureSampler needs at least one record")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size / rank / world_size: {batch_size}, {rank}, {world_size}")
        if mode not in ("natural", "balanced", "temperature"):
            raise ValueError(f"sampler must be 'natural', 'balanced' or 'temperature', got {mode!r}")
        if mode == "temperature" and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.names = sorted(
            set(domains), key=lambda d: (DOMAINS.index(d) if d in DOMAINS else len(DOMAINS), d)
        )
        self.members = [
            np.flatnonzero(np.asarray(domains) == d) for d in self.names
        ]  # per domain: record indices
        counts = np.array([len(m) for m in self.members], dtype=np.float64)
        if mode == "natural":
            weights = counts
        elif mode == "balanced":
            weights = np.ones_like(counts)
        else:
            weights = counts ** (1.0 / temperature)
        self.probs = weights / weights.sum()  # [D]

    @property
    def weights(self) -> dict[str, float]:
        """Domain -> sampling probability."""
        return {d: float(p) for d, p in zip(self.names, self.probs)}

    def batch(self, epoch: int, index: int, probs: Sequence[float] | None = None, draw: int = 0) -> list[int]:
        """Record indices of batch ``index`` of ``epoch`` on this process (a pure function of the arguments).

        Args:
            epoch: stream epoch.
            index: batch within the epoch.
            probs: domain probabilities in :attr:`names` order; None: the mode's (:attr:`probs`).
            draw: 0 for the stream's batch; k >= 1 for the k-th extra batch drawn for the same position
                (an independent draw from the same mixture).
        """
        rng = np.random.default_rng([self.seed, epoch, index] if draw == 0 else [self.seed, epoch, index, draw])
        n = self.batch_size * self.world_size
        p = self.probs if probs is None else np.asarray(probs, dtype=np.float64)
        picks = rng.choice(len(self.names), size=n, p=p / p.sum())  # [n] domain of each slot
        within = rng.random(n)  # [n] uniform position inside the domain
        records = [int(self.members[d][int(u * len(self.members[d]))]) for d, u in zip(picks, within)]
        return records[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


@dataclass
class _Position:
    """Next stream index to hand out (shared by the module and its training stream)."""

    next: int = 0


class _BatchStream(IterableDataset):
    """Collated training batches from the stream position to the end of its epoch.

    Worker w of W produces the batches b with ``(b - first) % W == w``; the DataLoader interleaves
    workers round-robin, so batches arrive in stream order.
    """

    def __init__(
        self,
        dataset: ClinicalDataset,
        sampler: MixtureSampler,
        steps: int,
        position: _Position,
        domain_vocab: Sequence[str],
        schedule: AdaptiveSchedule | None = None,
    ) -> None:
        self.dataset, self.sampler, self.steps = dataset, sampler, steps
        self.position, self.domain_vocab, self.schedule = position, tuple(domain_vocab), schedule

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[PromptBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, first = divmod(self.position.next, self.steps)
        for b in range(first, self.steps):
            if (b - first) % workers != worker:
                continue
            stream_index = epoch * self.steps + b
            probs = self.schedule.probabilities(stream_index) if self.schedule is not None else None
            samples = [self.dataset[i] for i in self.sampler.batch(epoch, b, probs)]
            for sample in samples:
                if sample is not None:
                    sample.stream_index = stream_index
            yield collate(samples, self.domain_vocab)


def _as_is(batch: PromptBatch) -> PromptBatch:
    return batch


class ClinicalDataModule(L.LightningDataModule):
    """Clinical records from manifests and/or the embedded demo set, mixed across domains.

    Args:
        manifests: JSONL manifests to read (paths inside them are relative to each manifest), or None.
        demo: also read the embedded demo set, built (or reused) in ``demo_dir``.
        demo_dir: where the demo set lives; None means ``$QOQ_CACHE/demo`` (``~/.cache/qoq/demo``).
        real_only: drop synthetic records.
        domains: keep only these clinical domains (None: all of them).
        batch_size: prompts per training batch (per process).
        val_batch_size: prompts per validation / test batch.
        image_size: side of the square images and video frames, in pixels.
        num_frames: frames sampled from each video / 3-D volume.
        ecg_spec: leads, sampling rate and duration of ECG items.
        skip_invalid: skip and count bad manifest lines and unreadable files instead of failing; the
            skipped records are listed in ``<run>/skipped.jsonl`` (file, line, reason) and their total is
            printed at the end of the run.
        check_files: how :meth:`setup` vets every record's files before anything trains: ``"load"``
            decodes each one with its loader (a corrupt DICOM, a NaN or wrong-shape ECG, an empty image
            fail at once, naming the manifest line), ``"exists"`` only checks that they exist (faster on
            very large sets; bad files then surface when they are drawn).
        val_fraction: share of each domain's records held out (chosen by record-id hash) for
            validation and test.
        sampler: how training batches mix domains: ``natural``, ``balanced``, ``temperature`` or
            ``adaptive`` (tilted each step toward the domains the RL system reports as needing samples;
            needs ``num_workers: 0``).
        temperature: T of the ``temperature`` sampler (p_d proportional to n_d ** (1 / T)).
        adaptive: settings of the ``adaptive`` sampler (base mixture, tilt, floor, lag); None: defaults.
        steps_per_epoch: training batches per stream epoch; None means ceil(train records / batch_size).
        seed: seed of the training stream (batch b of epoch e depends on seed, e and b only); None derives
            it from the global seed (``seed_everything``; :func:`qoq.seeds.derive_seed`).
        num_workers: DataLoader worker processes.
        instruction: the response-format instruction appended to every prompt; default the paper's
            prompt contract (:data:`qoq.rl.rewards.RESPONSE_FORMAT`); a short one saves compute for tiny
            policies trained from scratch.
        val_manifests: manifests validated on instead of the held-out split (the training split still
            holds out ``val_fraction``; set it to 0 to train on every record).
        test_manifests: manifests ``qoq test`` evaluates instead of the held-out split; the report folder
            is named after them (``reports/test-step<N>-<name>``).
        predict: what ``qoq predict`` runs on: ``{manifests: [...]}`` (unlabelled JSONL) or
            ``{file: F, question: Q}``; see :class:`~qoq.data.predict.PredictInput`.
    """

    def __init__(
        self,
        manifests: list[str] | None = None,
        demo: bool = False,
        demo_dir: str | None = None,
        real_only: bool = False,
        domains: list[str] | None = None,
        batch_size: int = 8,
        val_batch_size: int = 16,
        image_size: int = 64,
        num_frames: int = 4,
        ecg_spec: ECGSpec = ECGSpec(),  # noqa: B008 - frozen, safe to share
        skip_invalid: bool = False,
        check_files: Literal["load", "exists"] = "load",
        val_fraction: float = 0.1,
        sampler: SamplerMode = "natural",
        temperature: float = 2.0,
        adaptive: AdaptiveSampling | None = None,
        steps_per_epoch: int | None = None,
        seed: int | None = None,
        num_workers: int = 0,
        instruction: str | None = RESPONSE_FORMAT,
        val_manifests: list[str] | None = None,
        test_manifests: list[str] | None = None,
        predict: PredictInput | None = None,
    ) -> None:
        super().__init__()
        if not (manifests or demo or test_manifests or val_manifests or predict):
            raise ValueError("give manifests, or demo=True for the embedded demo set")
        if sampler == "adaptive" and num_workers > 0:
            raise ValueError(
                "sampler: adaptive needs num_workers: 0 (worker processes would not see the probabilities "
                "the training steps update)"
            )
        self.manifests = [str(m) for m in manifests or []]
        self.demo, self.demo_dir, self.real_only = demo, demo_dir, real_only
        self.domains = [check_domain(d) for d in domains] if domains else None
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.image_size, self.num_frames, self.ecg_spec = image_size, num_frames, ecg_spec
        if check_files not in ("load", "exists"):
            raise ValueError(f"check_files must be 'load' or 'exists', got {check_files!r}")
        self.skip_invalid, self.check_files, self.val_fraction = skip_invalid, check_files, val_fraction
        self.sampler_mode, self.temperature = sampler, temperature
        self.adaptive = adaptive if adaptive is not None else AdaptiveSampling()
        if seed is None:
            seed = derive_seed(torch.initial_seed(), "data")
        self.steps_per_epoch, self.seed, self.num_workers = steps_per_epoch, seed, num_workers
        self.instruction = instruction
        self.val_manifests = [str(m) for m in val_manifests or []]
        self.test_manifests = [str(m) for m in test_manifests or []]
        self.predict = predict
        self._predict_records: list[Record] = []
        #: Domain vocabulary of ``PromptBatch.domain_ids``: always all of DOMAINS (stable ids).
        self.domain_vocab: list[str] = list(DOMAINS)
        #: Dataset names present (sorted), filled by :meth:`setup`.
        self.dataset_vocab: list[str] = []
        self.skip_counter = SkipCounter()
        self.train_records: list[Record] = []
        self.val_records: list[Record] = []
        self._position = _Position()
        self._schedule: AdaptiveSchedule | None = None  # sampler: adaptive, built with the records
        self._pending_schedule: dict[str, Any] | None = None  # a loaded state, applied when it is built
        self._extra: tuple[ClinicalDataset, MixtureSampler] | None = None

    # ------------------------------------------------------------------------------------- setup
    def _demo_manifest(self, quiet: bool) -> str:
        from qoq.data.demo import build_demo

        demo_dir = Path(self.demo_dir).expanduser() if self.demo_dir else default_demo_dir()
        return str(build_demo(demo_dir, real_only=self.real_only, quiet=quiet, brief_if_reused=not verbose()))

    def prepare_data(self) -> None:
        """Build the demo set (once per machine, before :meth:`setup`) and print its summary."""
        if self.demo and self._needs_training_records():
            self._demo_manifest(quiet=False)

    def _needs_training_records(self, stage: str | None = None) -> bool:
        """False when ``stage`` (default: the trainer's) reads only sets of its own (predict inputs,
        test / val manifests)."""
        fn = stage or getattr(getattr(self.trainer, "state", None), "fn", None)
        own = {"predict": True, "test": bool(self.test_manifests), "validate": bool(self.val_manifests)}
        return not own.get(getattr(fn, "value", fn), False)

    def _read_records(self, manifests: Sequence[str] | None = None) -> list[Record]:
        """The records of ``manifests`` (default: the training sources, demo set included), filtered."""
        if manifests is None:
            sources = list(self.manifests)
            if self.demo:  # built by prepare_data, or now when setup is called alone
                sources.append(self._demo_manifest(quiet=True))
            if not sources:
                raise ValueError("no training records: give manifests, or demo=True for the embedded demo set")
        else:
            sources = list(manifests)
        records: list[Record] = []
        first_seen: dict[str, str] = {}
        for manifest in sources:
            check = "load" if self.check_files == "load" else True
            for record in read_manifest(
                manifest, skip_invalid=self.skip_invalid, counter=self.skip_counter, check_files=check,
                ecg_spec=self.ecg_spec,
            ):
                if record.id in first_seen:
                    raise ValueError(
                        f"record id {record.id!r} appears in {first_seen[record.id]} and {manifest}"
                    )
                first_seen[record.id] = manifest
                records.append(record)
        kept = [
            r
            for r in records
            if (self.domains is None or r.domain in self.domains)
            and (not self.real_only or r.origin == "real")
        ]
        if not kept:
            raise ValueError(
                f"no records left of {len(records)} after filtering (domains={self.domains}, "
                f"real_only={self.real_only}) in {sources}"
            )
        return kept

    def setup(self, stage: str | None = None) -> None:
        """Read the records and split off the held-out records (once); print the domain mix.

        A stage that reads only sets of its own (``predict``; ``test`` with ``test_manifests``;
        ``validate`` with ``val_manifests``) leaves the training records unread.
        """
        if stage == "predict":
            self._predict_records = self._read_predict_inputs()  # bad inputs fail before any model work
        if self.train_records or (stage is not None and not self._needs_training_records(stage)):
            return
        records = self._read_records()
        self.train_records, self.val_records = split_records(records, self.val_fraction)
        self.dataset_vocab = sorted({r.dataset for r in records})
        counts = Counter(r.domain for r in self.train_records)
        mix = ", ".join(f"{d} {counts[d]} ({p:.2f})" for d, p in self.sampler().weights.items())
        rank_zero_info(
            f"qoq data: {len(self.train_records)} train / {len(self.val_records)} held-out records; "
            f"{self.sampler_mode} mix, domain records (probability): {mix}"
        )
        self._write_skipped()

    def _write_skipped(self) -> None:
        """List the skipped records in ``<run>/skipped.jsonl`` (rank 0 of an attached trainer)."""
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero or not self.skip_counter.total:
            return
        import json

        path = Path(trainer.default_root_dir) / "skipped.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(entry) + "\n" for entry in self.skip_counter.skipped))
        rank_zero_info(f"qoq data: {self.skip_counter.report()}\n  listed in {path}")

    def teardown(self, stage: str) -> None:
        """At the end of a run, say how many records were skipped (and where they are listed)."""
        if self.skip_counter.total and self.trainer is not None:
            where = Path(self.trainer.default_root_dir) / "skipped.jsonl"
            rank_zero_info(f"qoq data: skipped {self.skip_counter.total} record(s) in this run; see {where}")

    def sampler(self) -> MixtureSampler:
        """The training-batch sampler, for this process's rank when a trainer is attached."""
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        return MixtureSampler(
            [r.domain for r in self.train_records],
            self.batch_size,
            self.adaptive.base if self.sampler_mode == "adaptive" else self.sampler_mode,
            self.temperature,
            self.seed,
            rank,
            world,
        )

    @property
    def steps(self) -> int:
        """Training batches per stream epoch."""
        if self.steps_per_epoch is not None:
            return self.steps_per_epoch
        return max(1, math.ceil(len(self.train_records) / self.batch_size))

    def _dataset(self, records: list[Record]) -> ClinicalDataset:
        return ClinicalDataset(
            records,
            self.image_size,
            self.num_frames,
            self.ecg_spec,
            self.skip_invalid,
            self.skip_counter,
            instruction=self.instruction,
        )

    # ------------------------------------------------------------------------------- dataloaders
    def train_dataloader(self) -> DataLoader:
        """The training stream, from the current position to the end of its epoch."""
        self.setup("fit")
        stream = _BatchStream(
            self._dataset(self.train_records),
            self.sampler(),
            self.steps,
            self._position,
            self.domain_vocab,
            self.schedule(),
        )
        return DataLoader(stream, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers)

    # ---------------------------------------------------------------------- adaptive sampling
    def schedule(self) -> AdaptiveSchedule | None:
        """The adaptive sampler's schedule (``sampler: adaptive``), built once the records are read; else None."""
        if self.sampler_mode != "adaptive":
            return None
        if self._schedule is None:
            self.setup("fit")
            mix = self.sampler()
            self._schedule = AdaptiveSchedule(self.adaptive.sampler(mix.names, mix.weights), lag=self.adaptive.lag)
            if self._pending_schedule is not None:
                self._schedule.load_state_dict(self._pending_schedule)
                self._pending_schedule = None
        return self._schedule

    def observe_domain_stats(self, stream_index: int, domain_stats: dict[str, dict[str, float]]) -> None:
        """Take the per-domain statistics the RL system measured on batch ``stream_index``.

        A no-op unless ``sampler: adaptive``. Domains absent from the training records are ignored.

        Args:
            stream_index: the batch's position in the training stream (``PromptBatch.stream_index``).
            domain_stats: domain name -> ``{"zero_var_frac": share of its groups whose rewards were all
                equal, "mean_reward": its mean reward, ...}``
                (:func:`qoq.rl.groups.domain_batch_stats` keyed by name).
        """
        schedule = self.schedule()
        if schedule is None or stream_index < 0:
            return
        known = set(schedule.sampler.domains)
        schedule.observe(stream_index, {d: s for d, s in domain_stats.items() if d in known})

    def domain_probabilities(self) -> dict[str, float]:
        """Domain -> the probability batches are drawn with now (adaptive: after the latest report)."""
        schedule = self.schedule()
        if schedule is not None:
            return schedule.sampler.probabilities()
        return self.sampler().weights

    def extra_batch(self, stream_index: int, draw: int) -> PromptBatch:
        """The ``draw``-th extra batch for stream position ``stream_index`` (DAPO-style dynamic sampling).

        Drawn from the same mixture as the stream's batch at that position (in ``adaptive`` mode, with
        the same probabilities), independently of it and of the stream: a pure function of the seed,
        ``stream_index`` and ``draw``, so refilled steps are reproduced exactly on resume.

        Args:
            stream_index: the position of the batch being trained on.
            draw: 1 for the first extra batch, 2 for the second, ...

        Returns:
            A collated batch of ``batch_size`` prompts (``stream_index`` -1: it is not a stream batch).
        """
        if draw < 1 or stream_index < 0:
            raise ValueError(f"extra_batch: need draw >= 1 and stream_index >= 0, got {draw}, {stream_index}")
        if self._extra is None:
            self.setup("fit")
            self._extra = (self._dataset(self.train_records), self.sampler())
        dataset, sampler = self._extra
        schedule = self.schedule()
        probs = schedule.probabilities(stream_index) if schedule is not None else None
        epoch, index = divmod(stream_index, self.steps)
        return collate([dataset[i] for i in sampler.batch(epoch, index, probs, draw=draw)], self.domain_vocab)

    def _held_out(self, manifests: Sequence[str] = ()) -> DataLoader:
        """The records of ``manifests`` if any, else the held-out split, in order."""
        if manifests:
            records = self._read_records(manifests)
        else:
            self.setup()
            records = self.val_records
        if not records:
            raise ValueError("no held-out records: raise val_fraction or add records (a domain needs >= 2)")
        return self._loader(records, self.domain_vocab)

    def _loader(self, records: list[Record], vocab: Sequence[str]) -> DataLoader:
        return DataLoader(
            self._dataset(records),
            batch_size=self.val_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=partial(collate, domain_vocab=vocab),
        )

    def val_dataloader(self) -> DataLoader:
        """``val_manifests`` if given, else the held-out split, in order."""
        return self._held_out(self.val_manifests)

    def test_dataloader(self) -> DataLoader:
        """``test_manifests`` if given, else the held-out split (the same records as validation), in order."""
        return self._held_out(self.test_manifests)

    def _read_predict_inputs(self) -> list[Record]:
        if self.predict is None:
            raise ValueError(
                "qoq predict needs inputs: --data.predict.manifests '[unlabelled.jsonl]' or "
                "--data.predict.file FILE --data.predict.question '...'"
            )
        return self.predict.records()

    def predict_dataloader(self) -> DataLoader:
        """The ``predict`` inputs, in order (gold fields optional; domain ``unspecified`` when not given)."""
        records = self._predict_records or self._read_predict_inputs()
        return self._loader(records, (*self.domain_vocab, UNSPECIFIED))

    def eval_set_name(self, split: str) -> str | None:
        """The name of ``split``'s own manifests (``val`` / ``test``), or None for the held-out split."""
        manifests = {"val": self.val_manifests, "test": self.test_manifests}.get(split)
        return "+".join(Path(m).name.split(".")[0] for m in manifests) if manifests else None

    # ------------------------------------------------------------------------------------ resume
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Record that the trainer took a training batch (its stream index), for exact resume."""
        if isinstance(batch, PromptBatch) and batch.stream_index >= 0:
            self._position.next = batch.stream_index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The stream position (next batch index), the settings the stream depends on and, with
        ``sampler: adaptive``, the adaptive schedule."""
        state = {"next_batch": self._position.next, **self._stream_settings()}
        if self.sampler_mode == "adaptive":
            schedule = self._schedule
            state["adaptive"] = schedule.state_dict() if schedule is not None else self._pending_schedule
        return state

    def _stream_settings(self) -> dict[str, Any]:
        steps = self.steps if self.train_records else self.steps_per_epoch
        return {
            "seed": self.seed,
            "sampler": self.sampler_mode,
            "batch_size": self.batch_size,
            "steps_per_epoch": steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the stream where the saved run stopped (a resumed fit); evaluation ignores the stream.

        Args:
            state_dict: what :meth:`state_dict` returned.

        Raises:
            ValueError: when fitting, if the saved stream settings differ from this module's (the stream
                would differ).
        """
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn != "fit":
            return  # test / validate / predict with --ckpt_path: no training stream to continue
        for key, mine in self._stream_settings().items():
            saved = state_dict.get(key)
            if mine is not None and saved is not None and saved != mine:
                raise ValueError(f"the checkpoint's data stream used {key}={saved!r}, this run has {mine!r}")
        self._position.next = int(state_dict["next_batch"])
        adaptive = state_dict.get("adaptive")
        if self.sampler_mode == "adaptive" and adaptive is not None:
            if self._schedule is not None:
                self._schedule.load_state_dict(adaptive)
            else:
                self._pending_schedule = dict(adaptive)


class MultiDomainDataModule(ClinicalDataModule):
    """All clinical domains mixed (the paper's setting); a :class:`ClinicalDataModule` without a domain filter.

    Use ``sampler: temperature`` or ``balanced`` to raise rare domains' share of the batches, or
    ``adaptive`` to follow the domains the RL system reports as lacking signal or reward.
    """


class ChestXrayDataModule(ClinicalDataModule):
    """Chest X-ray records only (domain ``chest_xray``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["chest_xray"], **kwargs)


class MammographyDataModule(ClinicalDataModule):
    """Mammography records only (domain ``mammography``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["mammography"], **kwargs)


class DermoscopyDataModule(ClinicalDataModule):
    """Dermoscopy records only (domain ``dermoscopy``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["dermoscopy"], **kwargs)


class CTDataModule(ClinicalDataModule):
    """CT records only (domain ``ct``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["ct"], **kwargs)


class FundusDataModule(ClinicalDataModule):
    """Fundus photography records only (domain ``fundus``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["fundus"], **kwargs)


class UltrasoundDataModule(ClinicalDataModule):
    """Ultrasound records only (domain ``ultrasound``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["ultrasound"], **kwargs)


class MRIDataModule(ClinicalDataModule):
    """MRI records only (domain ``mri``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["mri"], **kwargs)


class PathologyDataModule(ClinicalDataModule):
    """Pathology records only (domain ``pathology``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["pathology"], **kwargs)


class ECGDataModule(ClinicalDataModule):
    """ECG records only (domain ``ecg``); the arguments are :class:`ClinicalDataModule`'s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(domains=["ecg"], **kwargs)
