"""The benchmark builder: counts, imbalance, label correctness, determinism, caching, honesty fields."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from experiments.run_ablation import SMOKE_COUNTS, SMOKE_EVAL_PER_DOMAIN
from qoq.data.benchmark import (
    DAB_NEGATIVE,
    DAB_POSITIVE,
    DAB_THRESHOLD,
    EVAL_MANIFEST,
    TASKS,
    TRAIN_MANIFEST,
    Augment,
    BenchmarkDataModule,
    build_benchmark,
    imbalance_ratio,
)
from qoq.data.loaders import read_image
from qoq.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]


def _records(root: Path):
    return read_manifest(root / TRAIN_MANIFEST), read_manifest(root / EVAL_MANIFEST)


def test_default_counts_are_100_to_1_across_seven_domains() -> None:
    counts = {t.domain: t.train for t in TASKS}
    assert len(counts) == 7
    assert max(counts.values()) / min(counts.values()) == 100
    assert counts["ct"] == 1000 and counts["ultrasound"] == 10 and counts["fundus"] == 10


def test_counts_per_domain_and_balanced_labels(small_benchmark: Path) -> None:
    train, evals = _records(small_benchmark)
    assert Counter(r.domain for r in train) == SMOKE_COUNTS
    assert Counter(r.domain for r in evals) == {d: SMOKE_EVAL_PER_DOMAIN for d in SMOKE_COUNTS}
    assert imbalance_ratio(train) == 8.0
    assert imbalance_ratio(evals) == 1.0
    # Labels cycle through each label set: ct has 8 records over 2 labels -> 4 each.
    assert Counter(r.answer[0] for r in train if r.domain == "ct") == {
        "contrast-enhanced": 4,
        "non-contrast": 4,
    }
    ids = [r.id for r in train + evals]
    assert len(set(ids)) == len(ids)


def test_honesty_fields(small_benchmark: Path) -> None:
    train, evals = _records(small_benchmark)
    for r in train + evals:
        synthetic = r.origin == "synthetic"
        assert r.origin in ("real", "synthetic")
        assert r.dataset.startswith("synthetic") == synthetic
        assert Path(r.images[0]).name.startswith("synthetic") == synthetic
        assert r.label_source
        assert {"package", "path", "licence", "builder", "split"} <= set(r.source)
        assert r.source["split"] == ("train" if r in train else "eval")
        if synthetic:
            assert r.label_source == "generator (correct by construction)"
        else:
            assert "augmentation" in r.source  # exactly what was done to the real image
            assert r.source["package"] != "qoq"
    assert {r.domain for r in train if r.origin == "synthetic"} == {"mammography"}


def test_demo_derived_labels_follow_their_source_record(small_benchmark: Path) -> None:
    """The label is the demo record's label, and the image really is the described view of its image."""
    demo = {r.id: r for r in read_manifest(small_benchmark / "demo" / "manifest.jsonl")}
    train, evals = _records(small_benchmark)
    checked = 0
    for r in train + evals:
        if "derived_from" not in r.source:
            continue
        base = demo[r.source["derived_from"].removeprefix("qoq demo set record ")]
        assert base.answer == r.answer and base.origin == "real"
        assert r.source["path"] == base.source["path"]
        view = _replay_geometry(read_image(base.images[0]), r.source["augmentation"])
        stored = read_image(r.images[0]).astype(float).mean(-1)
        assert np.corrcoef(view.ravel(), stored.ravel())[0, 1] > 0.8, r.id
        checked += 1
    assert checked >= 20


def _replay_geometry(img: np.ndarray, steps: str) -> np.ndarray:
    """The crop / flips / rotation an augmentation description names, resized to 64 (grey, float)."""
    from PIL import Image

    crop = re.search(r"crop (\d+)x(\d+) at \((\d+), (\d+)\)", steps)
    if crop:
        w, h, x, y = map(int, crop.groups())
        img = img[y : y + h, x : x + w]
    if "hflip" in steps:
        img = img[:, ::-1]
    if "vflip" in steps:
        img = img[::-1]
    rot = re.search(r"rot(\d+)", steps)
    if rot:
        img = np.rot90(img, int(rot.group(1)) // 90)
    pil = Image.fromarray(np.ascontiguousarray(img)).resize((64, 64), Image.Resampling.BILINEAR)
    return np.asarray(pil).astype(float).mean(-1)


def test_dab_tiles_meet_their_definition(small_benchmark: Path) -> None:
    """Recompute the DAB share of each pathology tile from the original slide at the recorded position."""
    from skimage.color import rgb2hed

    from qoq.data.demo import SOURCES

    slide = read_image(next(s for s in SOURCES if s.key == "ihc").locate())
    train, evals = _records(small_benchmark)
    tiles = [r for r in train + evals if r.domain == "pathology"]
    assert {r.answer[0] for r in tiles} == {"DAB-positive", "DAB-negative"}
    for r in tiles:
        side, _, x, y = map(
            int, re.search(r"tile (\d+)x(\d+) at \((\d+), (\d+)\)", r.source["augmentation"]).groups()
        )
        share = float((rgb2hed(slide[y : y + side, x : x + side])[..., 2] > DAB_THRESHOLD).mean())
        assert (share >= DAB_POSITIVE) if r.answer == ("DAB-positive",) else (share <= DAB_NEGATIVE)


def test_deterministic_cached_and_seeded(small_benchmark: Path, tmp_path: Path) -> None:
    demo = small_benchmark / "demo"
    kwargs = {
        "counts": SMOKE_COUNTS,
        "eval_per_domain": SMOKE_EVAL_PER_DOMAIN,
        "demo_dir": demo,
        "quiet": True,
    }
    again = build_benchmark(tmp_path / "again", seed=0, **kwargs)
    assert again.read_text() == (small_benchmark / TRAIN_MANIFEST).read_text()
    assert _image_digests(tmp_path / "again") == _image_digests(small_benchmark)

    before = again.stat().st_mtime_ns
    assert build_benchmark(tmp_path / "again", seed=0, **kwargs) == again  # reused, not rewritten
    assert again.stat().st_mtime_ns == before

    other = build_benchmark(tmp_path / "other", seed=1, **kwargs)
    assert _image_digests(tmp_path / "other") != _image_digests(small_benchmark)
    assert Counter(r.domain for r in read_manifest(other)) == SMOKE_COUNTS


def _image_digests(root: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "files").rglob("*.png"))
    }


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ecg"):
        build_benchmark(tmp_path, counts={"ecg": 3})
    with pytest.raises(ValueError, match="must be >= 1"):
        build_benchmark(tmp_path, counts={"ct": 0})


def test_augment_describes_what_it_did() -> None:
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, :40] = 255  # left half white
    out, steps = Augment(crop=(0.5, 0.5), hflip=False)(img, np.random.default_rng(0), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    w, h, x, _ = map(int, re.search(r"crop (\d+)x(\d+) at \((\d+), (\d+)\)", steps).groups())
    assert (w, h) == (40, 20)
    expected = 255.0 * np.clip(40 - x, 0, 40) / 40  # share of white columns in the crop
    assert abs(out.mean() - expected) < 20


def test_data_module_serves_the_balanced_eval_split(small_benchmark: Path) -> None:
    dm = BenchmarkDataModule(root=str(small_benchmark), counts=SMOKE_COUNTS, eval_per_domain=SMOKE_EVAL_PER_DOMAIN,
                             batch_size=4)  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_records) == sum(SMOKE_COUNTS.values())
    assert Counter(r.domain for r in dm.val_records) == {d: SMOKE_EVAL_PER_DOMAIN for d in SMOKE_COUNTS}
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 and batch.modalities["image"].values.shape == (4, 3, 64, 64)
    assert dm.sampler().weights["ct"] == pytest.approx(8 / 21)  # natural mix keeps the imbalance


def test_rl_and_sft_configs_share_one_policy() -> None:
    """The RL run loads the SFT checkpoint, so both configs must build the same policy and tokenizer."""
    rl = yaml.safe_load((ROOT / "configs/benchmark.yaml").read_text())
    sft = yaml.safe_load((ROOT / "configs/benchmark_sft.yaml").read_text())
    assert rl["model"]["init_args"]["policy"] == sft["model"]
    assert rl["data"] == sft["data"] == "data/benchmark.yaml"
    corpus = "\n".join(sft["model"]["init_args"]["lm"]["init_args"]["extra_corpus"])
    assert all(t.problem in corpus for t in TASKS)  # the prompts tokenize compactly
