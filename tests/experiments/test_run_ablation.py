"""The ablation runner: its command lines, its statistics, and ``--smoke`` end to end through the real CLI."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import pytest

from experiments.run_ablation import (
    BALANCING_METHODS,
    ROOT,
    SFT,
    Plan,
    fmt,
    main,
    mean_std,
    moving_average,
    parse_args,
    plan_from_args,
    read_curves,
)


def test_commands_swap_only_the_algorithm_file(tmp_path: Path) -> None:
    plan = Plan(root=tmp_path, benchmark_dir=tmp_path / "bench", steps=7)
    grpo, drpo = plan.fit_argv("grpo", 1), plan.fit_argv("drpo", 1)
    assert grpo[:5] == [
        "fit",
        "--config",
        "configs/benchmark.yaml",
        "--config",
        "configs/algorithm/grpo.yaml",
    ]
    differ = [(a, b) for a, b in zip(grpo, drpo) if a != b]
    assert differ == [("configs/algorithm/grpo.yaml", "configs/algorithm/drpo.yaml"),
                      (str(tmp_path / "grpo/seed1"), str(tmp_path / "drpo/seed1"))]  # fmt: skip
    assert grpo[grpo.index("--seed_everything") + 1] == "1"
    assert grpo[grpo.index("--model.init_args.init_policy_from") + 1] == str(
        tmp_path / "sft/seed1/checkpoints/last.ckpt"
    )
    assert grpo[grpo.index("--trainer.max_steps") + 1] == "7"
    test = plan.test_argv("drpo", 1)
    assert test[test.index("--ckpt_path") + 1] == str(tmp_path / "drpo/seed1/checkpoints/last.ckpt")
    assert test[test.index("--data.init_args.seed") + 1] == "1"  # the checkpoint's data stream seed
    assert "--ckpt_path" not in plan.test_argv(SFT, 1)  # the SFT row: RL config at step 0, SFT weights
    assert plan.fit_argv(SFT, 1)[:3] == ["fit", "--config", "configs/benchmark_sft.yaml"]


def test_smoke_defaults_stay_out_of_the_results_folder(tmp_path: Path) -> None:
    plan = plan_from_args(parse_args(["--smoke", "--root", str(tmp_path)]))
    assert plan.results == tmp_path / "results" and plan.steps == 2 and plan.sft_steps == 2
    assert plan_from_args(parse_args([])).results.parts[-2:] == ("experiments", "results")


def test_balancing_methods_join_the_same_ablation(tmp_path: Path) -> None:
    plan = plan_from_args(parse_args(["--methods", "grpo", "drpo", "--balancing", "--root", str(tmp_path)]))
    assert plan.methods == ("grpo", "drpo", "gdpo", "disco", "fairgrpo", "drpo_adaptive", "grpo_adaptive",
                            "grpo_dynamic")  # fmt: skip
    assert all((ROOT / "configs" / "algorithm" / f"{m}.yaml").is_file() for m in BALANCING_METHODS)
    # one algorithm file swapped, same seeds and SFT start: the runs are comparable seed by seed
    grpo, dynamic = plan.fit_argv("grpo", 0), plan.fit_argv("grpo_dynamic", 0)
    assert [(a, b) for a, b in zip(grpo, dynamic) if a != b] == [
        ("configs/algorithm/grpo.yaml", "configs/algorithm/grpo_dynamic.yaml"),
        (str(tmp_path / "grpo/seed0"), str(tmp_path / "grpo_dynamic/seed0")),
    ]
    assert "--balancing" not in plan.command() and "grpo_dynamic" in plan.command()


def test_statistics_by_hand() -> None:
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert mean_std([0.5, math.nan]) == (0.5, 0.0, 1)
    assert fmt([1.0, 3.0]) == "2.000 ± 1.414"
    assert fmt([]) == "n/a"
    # A sparse per-domain curve: steps 1 and 4 only, trailing window of 2 steps.
    assert _nan_eq(moving_average({1: 1.0, 4: 0.0}, [1, 2, 3, 4, 5], 2), [1.0, 1.0, math.nan, 0.0, 0.0])


def _nan_eq(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == y for x, y in zip(a, b, strict=True))


def test_smoke_end_to_end_and_resume(small_benchmark: Path, tmp_path: Path) -> None:
    """SFT warm start, one DRPO run (2 steps each), both evaluated, results written; a rerun resumes."""
    argv = ["--smoke", "--methods", "drpo", "--seeds", "0", "--jobs", "1", "--root", str(tmp_path / "runs"),
            "--benchmark-dir", str(small_benchmark)]  # fmt: skip
    assert main(argv) == 0
    results = tmp_path / "runs" / "results"
    rows = list(csv.DictReader((results / "ablation.csv").open()))
    assert [(r["method"], r["status"]) for r in rows] == [(SFT, "ok"), ("drpo", "ok")]
    assert all(r["test/macro_f1/overall"] != "" for r in rows)
    markdown = (results / "ablation.md").read_text()
    assert (
        "| drpo |" in markdown
        and "| sft |" in markdown
        and "qoq fit --config configs/benchmark.yaml" in markdown
    )
    assert (results / "learning_curves.png").stat().st_size > 0
    fit_log = tmp_path / "runs" / "drpo" / "seed0" / "fit.log"
    assert fit_log.read_text().startswith(
        "qoq fit --config configs/benchmark.yaml --config configs/algorithm/drpo"
    )

    stamp = fit_log.stat().st_mtime_ns
    start = time.perf_counter()
    assert main(argv) == 0  # everything already there: only the tables are written again
    assert time.perf_counter() - start < 20
    assert fit_log.stat().st_mtime_ns == stamp


def test_unknown_method_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no configs/algorithm/ppo_magic.yaml"):
        main(["--smoke", "--methods", "ppo_magic", "--root", str(tmp_path)])


def test_curves_come_from_the_full_rollout_trace(tmp_path: Path) -> None:
    """Per-domain curves exist only at the steps where the domain was in the batch (exact, no carry-over)."""
    rows = [
        {"step": 0, "domain": "ct", "reward": 1.0, "advantage": 0.5},
        {"step": 0, "domain": "ct", "reward": 0.0, "advantage": -0.5},
        {"step": 0, "domain": "fundus", "reward": 0.25, "advantage": 2.0},
        {"step": 2, "domain": "ct", "reward": 1.0, "advantage": 0.0},
    ]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = read_curves(tmp_path)
    assert curves["train/reward"] == {0: 1.25 / 3, 1: 1.0}
    assert curves["train/reward/ct"] == {0: 0.5, 1: 1.0}
    assert curves["train/reward/fundus"] == {0: 0.25}  # absent at step 1
    assert curves["train/adv_scale/ct"] == {0: 0.5, 1: 0.0}
    assert curves["train/responses/ct"] == {0: 2.0, 1: 1.0}
    assert read_curves(tmp_path / "missing") == {}
