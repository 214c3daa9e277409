"""Benchmark v2: warm-start pool, held-out sources, label noise, its configs and its runner's bookkeeping."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from experiments import run_benchmark_v2 as v2
from qoq.data.benchmark import (
    EVAL_MANIFEST,
    HELD_OUT_SOURCES,
    IHC_SPLIT,
    SFT_MANIFEST,
    TRAIN_MANIFEST,
    BenchmarkDataModule,
    build_benchmark,
)
from qoq.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
COUNTS = {"ct": 12, "pathology": 6, "mammography": 3, "chest_xray": 2, "mri": 6, "fundus": 2, "ultrasound": 8}


@pytest.fixture(scope="module")
def v2_build(small_benchmark: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("benchmark_v2")
    build_benchmark(out, counts=COUNTS, eval_per_domain=6, sft_per_domain=4, held_out_sources=True,
                    label_noise={"ct": 0.5}, demo_dir=small_benchmark / "demo", quiet=True)  # fmt: skip
    return out


def test_warm_start_pool_is_balanced_and_separate(v2_build: Path) -> None:
    sft, train = read_manifest(v2_build / SFT_MANIFEST), read_manifest(v2_build / TRAIN_MANIFEST)
    assert Counter(r.domain for r in sft) == {d: 4 for d in COUNTS}
    assert Counter(r.domain for r in train) == COUNTS
    assert not {r.images[0] for r in sft} & {r.images[0] for r in train}
    assert all("label_noise" not in r.source for r in sft)


def test_held_out_sources_never_reach_training(v2_build: Path) -> None:
    train = read_manifest(v2_build / TRAIN_MANIFEST) + read_manifest(v2_build / SFT_MANIFEST)
    evals = read_manifest(v2_build / EVAL_MANIFEST)
    for (dataset, label), marker in HELD_OUT_SOURCES.items():
        held = [r for r in evals
                if r.answer == (label,) and r.source.get("derived_from", "").startswith(f"qoq demo set record {dataset}:")]  # fmt: skip
        assert held and all(marker in r.source["derived_from"] for r in held), (dataset, label)
        assert not [r for r in train if marker in r.source.get("derived_from", "")], (dataset, label)
    for r in evals + train:
        if r.domain == "pathology":
            x = int(re.search(r"at \((\d+), ", r.source["augmentation"]).group(1))
            assert (x >= IHC_SPLIT * 512) if r in evals else (x < IHC_SPLIT * 512), r.source["augmentation"]


def test_label_noise_only_in_the_training_stream_and_said(v2_build: Path) -> None:
    train = read_manifest(v2_build / TRAIN_MANIFEST)
    noisy = [r for r in train if "label_noise" in r.source]
    assert noisy and all(r.domain == "ct" for r in noisy)
    for r in noisy:
        made_for = re.search(r"made for '([^']+)'", r.source["label_noise"]).group(1)
        assert r.answer != (made_for,) and "label noise" in r.label_source
    assert all("label_noise" not in r.source for r in read_manifest(v2_build / EVAL_MANIFEST))


def test_v1_build_settings_are_unchanged(small_benchmark: Path) -> None:
    stamp = json.loads((small_benchmark / "build.json").read_text())
    assert "sft_per_domain" not in stamp  # v1 caches stay valid


def test_data_module_trains_on_the_pool(v2_build: Path) -> None:
    dm = BenchmarkDataModule(root=str(v2_build), counts=COUNTS, eval_per_domain=6, sft_per_domain=4,
                             held_out_sources=True, label_noise={"ct": 0.5}, train_split="sft", seed=0)  # fmt: skip
    dm.setup("fit")
    assert Counter(r.domain for r in dm.train_records) == {d: 4 for d in COUNTS}
    assert len(dm.val_records) == 6 * len(COUNTS)
    with pytest.raises(ValueError, match="sft_per_domain"):
        BenchmarkDataModule(root=str(v2_build), train_split="sft")


def _data(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / "data" / name).read_text())["init_args"]


def test_v2_data_files_differ_only_where_they_say() -> None:
    rl, sft, noisy = (
        _data("benchmark_v2.yaml"),
        _data("benchmark_v2_sft.yaml"),
        _data("benchmark_v2_noisy_head.yaml"),
    )
    assert {k for k in rl if rl[k] != sft[k]} == {"train_split"} and sft["train_split"] == "sft"
    assert {k for k in rl if rl[k] != noisy[k]} == {"label_noise"}
    counts = rl["counts"]
    assert max(counts.values()) / min(counts.values()) == 25
    assert rl["eval_per_domain"] == 200 and rl["held_out_sources"] is True


def test_v2_stages_share_one_policy_and_write_the_reward() -> None:
    rl = yaml.safe_load((ROOT / "configs" / "benchmark_v2.yaml").read_text())
    sft = yaml.safe_load((ROOT / "configs" / "benchmark_v2_sft.yaml").read_text())
    assert rl["model"]["init_args"]["policy"] == sft["model"] == "policy/benchmark.yaml"
    assert rl["model"]["init_args"]["reward"]["init_args"]["weights"] == {"accuracy": 0.9, "format": 0.1}
    assert rl["model"]["init_args"]["sampling"]["seed"] is None  # derived from seed_everything


def test_runner_commands_set_only_the_run_seed(tmp_path: Path) -> None:
    plan = v2.Plan(
        methods=("grpo", "drpo"), seeds=(3,), conditions=("easy_head", "noisy_head"), root=tmp_path
    )
    fit = plan.fit_argv("noisy_head", "drpo", 3)
    assert fit[fit.index("--seed_everything") + 1] == "3"
    assert not [a for a in fit if a.startswith("--") and "seed" in a and a != "--seed_everything"]
    assert fit[fit.index("--model.init_args.init_policy_from") + 1] == str(plan.sft_checkpoint(3))
    assert "configs/data/benchmark_v2_noisy_head.yaml" in fit
    assert fit.index("configs/data/benchmark_v2_noisy_head.yaml") < fit.index("configs/algorithm/drpo.yaml")
    assert plan.run_dir("easy_head", "sft", 3) == plan.run_dir(
        "noisy_head", "sft", 3
    )  # one warm start per seed
    t1 = plan.test_argv("easy_head", "grpo", 3, "test_t1")
    assert "{n: 4, max_new_tokens: 32, temperature: 1.0, seed: 3}" in t1


def test_statistics_by_hand(tmp_path: Path) -> None:
    mean, _, hi = v2.interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2) and hi - mean == pytest.approx(4.303 * 0.1 / 3**0.5)
    assert v2.fmt_interval([0.2, 0.25, 0.3]).endswith("* (n=3)")
    assert "*" not in v2.fmt_interval([-0.1, 0.2, 0.3])
    report = tmp_path / "r"
    report.mkdir()
    rows = [("a", 1.0, ["x"], "\\boxed{non-contrast}"), ("a", 0.0, ["y"], "\\boxed{chest}"),
            ("b", 1.0, ["x"], "\\boxed{chest, non-contrast}"), ("b", 1.0, ["x"], "")]  # fmt: skip
    report.joinpath("traces.jsonl").write_text("".join(
        json.dumps({"domain": "ct", "prompt_id": p, "rewards": {"accuracy": a}, "predicted": pred, "response": r})
        + "\n" for p, a, pred, r in rows))  # fmt: skip
    scores = v2.eval_scores(report)["ct"]
    # "chest" alone is chest X-ray's label: leaked; with ct's own "non-contrast" beside it, not counted
    assert scores == {"accuracy": 0.75, "in_labels": 1.0, "varied": 0.5, "foreign": 0.25, "records": 2.0}
    domains = v2.Domains(
        ("ct", "mri", "mammography"), {"ct": 50, "mri": 1, "mammography": 5}, ("mri",), ("mammography",)
    )
    s = v2.summary(
        {"ct": {"accuracy": 0.8}, "mri": {"accuracy": 0.2}, "mammography": {"accuracy": 0.0}}, domains
    )
    assert (
        s["macro"] == pytest.approx(0.5)
        and s["rare"] == pytest.approx(0.2)
        and s["worst"] == pytest.approx(0.2)
    )


def test_regimes_layer_on_the_condition_and_share_its_warm_start(tmp_path: Path) -> None:
    plan = v2.Plan(methods=("drpo",), seeds=(0,), conditions=("easy_head@group8",), root=tmp_path)
    fit = plan.fit_argv("easy_head@group8", "drpo", 0)
    assert fit.index("configs/algorithm/drpo.yaml") > fit.index("configs/benchmark_v2.yaml")
    assert "configs/regime/group8.yaml" in fit
    assert plan.benchmark_dir("easy_head@group8") == plan.benchmark_dir("easy_head")
    assert plan.run_dir("easy_head@group8", "drpo", 0) == tmp_path / "easy_head@group8" / "drpo" / "seed0"
    assert "configs/regime/group8.yaml" not in plan.test_argv("easy_head", "drpo", 0, "test")
    with pytest.raises(SystemExit):
        v2.parse_args(["--conditions", "easy_head@magic"])
    with pytest.raises(v2.argparse.ArgumentTypeError, match="unknown condition"):
        v2.check_condition("hard_head")
    with pytest.raises(v2.argparse.ArgumentTypeError, match="unknown regime 'magic'"):
        v2.check_condition("easy_head@magic")


def test_smoke_end_to_end_with_a_regime_and_resume(
    v2_build: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm start, one DRPO run in a regime (2 steps each), greedy and T = 1 evaluations, the report; a rerun
    resumes without fitting again. The benchmark is the small build above (the real one takes a minute)."""
    root = tmp_path / "runs"
    monkeypatch.setattr(v2, "build", lambda plan, condition: None)
    (root / "benchmark").parent.mkdir(parents=True)
    (root / "benchmark").symlink_to(v2_build)
    argv = ["--smoke", "--methods", "drpo", "--seeds", "0", "--jobs", "1", "--conditions", "easy_head@group8",
            "--root", str(root), "--results", str(tmp_path / "results")]  # fmt: skip
    assert v2.main(argv) == 0
    report = (tmp_path / "results" / "results.md").read_text()
    assert "## Overview" in report and "| easy_head@group8 | drpo |" in report and "| easy_head@group8 | sft |" in report
    fit_log = root / "easy_head@group8" / "drpo" / "seed0" / "fit.log"
    assert "configs/regime/group8.yaml" in fit_log.read_text().splitlines()[0]
    assert (root / "easy_head@group8" / "drpo" / "seed0" / "test_t1.json").is_file()
    stamp = fit_log.stat().st_mtime_ns
    assert v2.main(argv) == 0  # everything already there: only the report is written again
    assert fit_log.stat().st_mtime_ns == stamp
