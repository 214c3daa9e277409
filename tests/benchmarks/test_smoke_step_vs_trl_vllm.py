"""Smoke run of TRL's colocated-vLLM arm of the step benchmark (a process of its own: it initialises
torch.distributed)."""

from __future__ import annotations

import pytest
from bench_helpers import check_arm

from benchmarks import step_vs_trl


def test_trl_vllm_arm(bench_site, tmp_path):
    results = step_vs_trl.run(smoke=True, arms=("trl-vllm",), logdir=tmp_path)
    result = results["arms"]["trl-vllm"]
    assert "trl-vllm" in step_vs_trl.render(results)
    if "not_runnable" in result:  # found by the arm's own probe of TRL's sync, not by the CPU's name
        pytest.skip(f"trl-vllm is not runnable on this CPU: {result['not_runnable']}")
    check_arm(result)
    assert "GRPOTrainer.sync_weights" in result["profile_median_s"]
    assert len(result["vllm_logp_difference_mean"]) == step_vs_trl.SMOKE.steps


def test_an_arm_that_cannot_run_here_is_reported_not_crashed(monkeypatch, tmp_path):
    reason = "TRL's colocated vLLM weight sync fails: AttributeError: no weight_loader"

    def not_here(arm, smoke):
        raise step_vs_trl.NotRunnable(reason)

    monkeypatch.setattr(step_vs_trl, "run_arm", not_here)
    arms = step_vs_trl.run_arms(["trl-vllm"], smoke=True, out=tmp_path / "arms.json")
    assert arms == {"trl-vllm": {"not_runnable": reason}}
    results = {
        "settings": step_vs_trl.dataclasses.asdict(step_vs_trl.SMOKE),
        "arms": arms,
        "ratios": {},
        "target_ratio": step_vs_trl.TARGET_RATIO,
    }
    text = step_vs_trl.render(results)
    assert "| trl-vllm | not runnable on this CPU, see below |" in text
    assert f"**not runnable on this CPU**: {reason}" in text
