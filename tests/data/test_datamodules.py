"""Data modules: the held-out split, the mixture sampler (determinism, proportions, ranks), the training
stream with exact resume (also through a real Lightning checkpoint), and per-domain filtering."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from qoq.data.datamodules import (
    ClinicalDataModule,
    CTDataModule,
    ECGDataModule,
    MixtureSampler,
    MultiDomainDataModule,
    split_records,
)
from qoq.data.domains import DOMAINS
from qoq.data.manifest import write_manifest
from qoq.data.records import Record
from qoq.testing import quiet_trainer
from qoq.types import PromptBatch

#: The toy imbalanced mix: 80 / 15 / 5 records.
COUNTS = {"chest_xray": 80, "ct": 15, "ecg": 5}


def _toy_records(image: str) -> list[Record]:
    return [
        Record(
            id=f"{domain}-{i}",
            problem="<image> Which? Options: a, b.",
            answer=("a" if i % 2 else "b",),
            labels=("a", "b"),
            domain=domain,
            dataset=f"toy-{domain}",
            images=(image,),
            origin="synthetic" if i % 5 == 0 else "real",
        )
        for domain, n in COUNTS.items()
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> str:
    from PIL import Image

    root = tmp_path_factory.mktemp("toy")
    Image.fromarray(np.full((6, 6, 3), 90, dtype=np.uint8)).save(root / "x.png")
    return str(write_manifest(_toy_records(str(root / "x.png")), root / "toy.jsonl"))


def _module(manifest: str, cls=MultiDomainDataModule, **kw) -> ClinicalDataModule:
    kw = {"batch_size": 4, "image_size": 4, "val_fraction": 0.2, **kw}
    dm = cls(manifests=[manifest], **kw)
    dm.setup("fit")
    return dm


# --------------------------------------------------------------------------------------------- split
def test_split_holds_out_each_domain_by_id_hash() -> None:
    records = _toy_records("x.png") + [
        Record(
            id="lonely",
            problem="<image>?",
            answer=("a",),
            labels=("a",),
            domain="mri",
            dataset="one",
            images=("x.png",),
        )
    ]
    train, val = split_records(records, 0.2)
    held = {d: sum(r.domain == d for r in val) for d in (*COUNTS, "mri")}
    assert held == {"chest_xray": 16, "ct": 3, "ecg": 1, "mri": 0}  # round(n * 0.2), at least 1, never all
    assert len(train) + len(val) == len(records) and not {r.id for r in train} & {r.id for r in val}
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert {r.id for r in split_records(shuffled, 0.2)[1]} == {r.id for r in val}
    assert split_records(records, 0.0)[1] == []


# ------------------------------------------------------------------------------------------- sampler
def _domains() -> list[str]:
    return [d for d, n in COUNTS.items() for _ in range(n)]


def test_sampler_batches_are_a_pure_function_of_seed_epoch_and_index() -> None:
    a, b = MixtureSampler(_domains(), 8, seed=3), MixtureSampler(_domains(), 8, seed=3)
    assert a.batch(2, 5) == b.batch(2, 5)
    assert a.batch(0, 0) == a.batch(0, 0) != a.batch(0, 1)
    assert a.batch(1, 0) != a.batch(0, 0)
    assert MixtureSampler(_domains(), 8, seed=4).batch(2, 5) != a.batch(2, 5)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("natural", [0.80, 0.15, 0.05]),
        ("balanced", [1 / 3, 1 / 3, 1 / 3]),
        # T = 2: sqrt(80), sqrt(15), sqrt(5) = 8.944, 3.873, 2.236, over their sum 15.053.
        ("temperature", [0.5942, 0.2573, 0.1485]),
    ],
)
def test_sampler_modes_give_their_proportions(mode: str, expected: list[float]) -> None:
    sampler = MixtureSampler(_domains(), 16, mode=mode, temperature=2.0, seed=0)
    np.testing.assert_allclose(list(sampler.weights.values()), expected, atol=1e-4)
    domains = np.array(_domains())
    drawn = np.concatenate([domains[sampler.batch(0, b)] for b in range(500)])  # 8000 slots
    observed = [float(np.mean(drawn == d)) for d in COUNTS]
    np.testing.assert_allclose(observed, expected, atol=0.02)


def test_ranks_take_slices_of_one_global_batch() -> None:
    whole = MixtureSampler(_domains(), 6, seed=1).batch(0, 3)
    parts = [MixtureSampler(_domains(), 3, seed=1, rank=r, world_size=2).batch(0, 3) for r in (0, 1)]
    assert parts[0] + parts[1] == whole


# -------------------------------------------------------------------------------------------- stream
def _take(dm: ClinicalDataModule, n: int, consume: int | None = None) -> list[PromptBatch]:
    """Fetch n training batches; the trainer 'takes' (on_after_batch_transfer) only the first ``consume``."""
    batches = []
    for batch in dm.train_dataloader():
        batches.append(batch)
        if len(batches) <= (n if consume is None else consume):
            dm.on_after_batch_transfer(batch, 0)
        if len(batches) == n:
            break
    return batches


def test_same_seed_same_batches(manifest: str) -> None:
    first = _take(_module(manifest, seed=7), 3)
    again = _take(_module(manifest, seed=7), 3)
    other = _take(_module(manifest, seed=8), 3)
    assert [b.ids for b in first] == [b.ids for b in again]
    assert [b.ids for b in first] != [b.ids for b in other]
    assert [b.stream_index for b in first] == [0, 1, 2]
    assert all(b.domain_ids.tolist() == [DOMAINS.index(d) for d in b.domains] for b in first)


def test_workers_keep_the_stream_order(manifest: str) -> None:
    alone = _take(_module(manifest, seed=2), 4)
    workers = _take(_module(manifest, seed=2, num_workers=2), 4)
    assert [b.ids for b in workers] == [b.ids for b in alone]
    assert [b.stream_index for b in workers] == [0, 1, 2, 3]


def test_resume_continues_with_the_exact_next_batch(manifest: str) -> None:
    dm = _module(manifest, steps_per_epoch=4)
    fetched = _take(dm, 3, consume=2)  # the third batch was prefetched but never taken
    state = dm.state_dict()
    assert state["next_batch"] == 2
    resumed = _module(manifest, steps_per_epoch=4)
    resumed.load_state_dict(state)
    rest = _take(resumed, 2)  # batches 2 and 3 end the stream's epoch 0
    assert [b.stream_index for b in rest] == [2, 3]
    assert rest[0].ids == fetched[2].ids
    nxt = _take(resumed, 1)[0]  # epoch 1 starts
    assert nxt.stream_index == 4
    expected = [resumed.train_records[i].id for i in resumed.sampler().batch(1, 0)]
    assert nxt.ids == expected


def test_resume_refuses_another_stream(manifest: str) -> None:
    state = _module(manifest, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _module(manifest, seed=2).load_state_dict(state)


class _Recorder(L.LightningModule):
    """Takes training batches and records their ids (a zero loss on one parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch.ids)
        return self.w.sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(
    manifest: str, max_steps: int, ckpt: Path | None = None, save: Path | None = None
) -> list[list[str]]:
    model = _Recorder()
    trainer = quiet_trainer(max_steps, limit_val_batches=0)
    trainer.fit(
        model,
        datamodule=MultiDomainDataModule(
            manifests=[manifest], batch_size=4, image_size=4, steps_per_epoch=4, sampler="balanced", seed=5
        ),
        ckpt_path=str(ckpt) if ckpt else None,
    )
    if save is not None:
        trainer.save_checkpoint(save)
    return model.seen


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_mid_epoch_sees_the_uninterrupted_stream(manifest: str, tmp_path: Path) -> None:
    whole = _fit(manifest, 6)
    first = _fit(manifest, 3, save=tmp_path / "step3.ckpt")
    second = _fit(manifest, 6, ckpt=tmp_path / "step3.ckpt")
    assert len(whole) == 6 and first == whole[:3]
    assert second == whole[3:]  # the rest of epoch 0 (1 batch), then epoch 1


def test_val_and_test_iterate_the_held_out_split_in_order(manifest: str) -> None:
    dm = _module(manifest, val_batch_size=7)
    ids = [i for batch in dm.val_dataloader() for i in batch.ids]
    assert ids == [r.id for r in dm.val_records]
    assert [i for batch in dm.test_dataloader() for i in batch.ids] == ids
    assert all(batch.stream_index == -1 for batch in dm.val_dataloader())


# ---------------------------------------------------------------------------------------- filtering
def test_per_domain_modules_keep_their_domain(manifest: str) -> None:
    dm = _module(manifest, cls=CTDataModule)
    assert {r.domain for r in dm.train_records + dm.val_records} == {"ct"}
    assert len(dm.train_records) + len(dm.val_records) == COUNTS["ct"]
    assert dm.domain_vocab == list(DOMAINS)  # ids stay stable whatever the filter
    assert set(_take(dm, 1)[0].domains) == {"ct"}
    with pytest.raises(TypeError):
        ECGDataModule(manifests=[manifest], domains=["ct"])


def test_filters_real_only_and_vocabularies(manifest: str) -> None:
    dm = _module(manifest, real_only=True, domains=["chest_xray", "ecg"])
    records = dm.train_records + dm.val_records
    assert {r.domain for r in records} == {"chest_xray", "ecg"} and all(r.origin == "real" for r in records)
    assert len(records) == 80 - 16 + 5 - 1  # every fifth record is synthetic
    assert dm.dataset_vocab == ["toy-chest_xray", "toy-ecg"]
    with pytest.raises(ValueError, match="unknown clinical domain"):
        MultiDomainDataModule(manifests=[manifest], domains=["radiology"])
    with pytest.raises(ValueError, match="manifests"):
        MultiDomainDataModule()


# ------------------------------------------------------------------------------- adaptive sampling
def _domain_stats(batch: PromptBatch) -> dict[str, dict[str, float]]:
    """Fake RL feedback: every ecg group scored alike and low, the other domains have signal."""
    return {d: {"zero_var_frac": 1.0 if d == "ecg" else 0.0, "mean_reward": 0.1 if d == "ecg" else 0.9}
            for d in set(batch.domains)}  # fmt: skip


class _Reporter(_Recorder):
    """A recorder that reports per-domain statistics the way PolicyOptimization does."""

    def __init__(self) -> None:
        super().__init__()
        self.last_domain_stats: dict[str, dict[str, float]] | None = None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        self.last_domain_stats = _domain_stats(batch)
        return super().training_step(batch, batch_idx)

    def configure_callbacks(self):
        from qoq.callbacks import DomainStatsFeedback

        return [DomainStatsFeedback()]


def _adaptive(manifest: str, **kw) -> MultiDomainDataModule:
    from qoq.data.adaptive import AdaptiveSampling

    settings = AdaptiveSampling(momentum=0.5, eta=3.0, floor=0.05)
    return MultiDomainDataModule(manifests=[manifest], batch_size=4, image_size=4, steps_per_epoch=4,
                                 sampler="adaptive", adaptive=settings, seed=5, **kw)  # fmt: skip


def _fit_adaptive(manifest: str, max_steps: int, ckpt: Path | None = None, save: Path | None = None):
    model, dm = _Reporter(), _adaptive(manifest)
    trainer = quiet_trainer(max_steps, limit_val_batches=0)
    trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt) if ckpt else None)
    if save is not None:
        trainer.save_checkpoint(save)
    return model.seen, dm


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_adaptive_stream_follows_the_reports_and_resumes_exactly(manifest: str, tmp_path: Path) -> None:
    whole, dm = _fit_adaptive(manifest, 10)
    first, _ = _fit_adaptive(manifest, 4, save=tmp_path / "step4.ckpt")
    second, resumed = _fit_adaptive(manifest, 10, ckpt=tmp_path / "step4.ckpt")
    assert len(whole) == 10 and first == whole[:4]
    assert second == whole[4:]  # the same batches, across the stream's epoch boundary, after resume
    assert resumed.state_dict() == dm.state_dict()
    # ecg (5 % of the records, base p = 0.05) had no signal in every report: sampled far more often now
    p = dm.domain_probabilities()
    assert p["ecg"] > 0.5 and min(p.values()) >= 0.05 - 1e-12
    state = torch.load(tmp_path / "step4.ckpt", map_location="cpu", weights_only=True)
    saved = next(v for k, v in state.items() if k.endswith("MultiDomainDataModule"))
    assert saved["sampler"] == "adaptive" and saved["adaptive"]["last"] == 3
    # the first two batches are drawn from the natural mixture lifted to the floor (ecg 4 / 89 -> 0.05)
    initial = dict(zip(dm.sampler().names, dm.schedule().initial))
    assert initial["ecg"] == pytest.approx(0.05)
    assert [dm.train_records[i].id for i in dm.sampler().batch(0, 1, dm.schedule().initial)] == whole[1]


def test_adaptive_without_reports_refuses_to_guess(manifest: str) -> None:
    dm = _adaptive(manifest)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="statistics of batch 0"):
        _take(dm, 3)
    with pytest.raises(ValueError, match="num_workers: 0"):
        _adaptive(manifest, num_workers=1)


def test_extra_batches_are_a_pure_function_of_position_and_draw(manifest: str) -> None:
    dm, again = _module(manifest, steps_per_epoch=4, seed=3), _module(manifest, steps_per_epoch=4, seed=3)
    stream = _take(dm, 2)
    one, two = dm.extra_batch(5, 1), dm.extra_batch(5, 2)
    assert one.ids == again.extra_batch(5, 1).ids and two.ids == again.extra_batch(5, 2).ids
    assert one.ids != two.ids and one.stream_index == -1 and len(one) == 4
    epoch, index = divmod(5, 4)
    assert one.ids == [dm.train_records[i].id for i in dm.sampler().batch(epoch, index, draw=1)]
    assert [b.ids for b in _take(_module(manifest, steps_per_epoch=4, seed=3), 2)] == [b.ids for b in stream]
    with pytest.raises(ValueError, match="draw >= 1"):
        dm.extra_batch(5, 0)
