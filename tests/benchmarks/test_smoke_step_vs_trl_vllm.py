"""Smoke run of TRL's colocated-vLLM arm of the step benchmark (a process of its own: it initialises
torch.distributed)."""

from __future__ import annotations

from bench_helpers import check_arm

from benchmarks import step_vs_trl


def test_trl_vllm_arm(bench_site, tmp_path):
    results = step_vs_trl.run(smoke=True, arms=("trl-vllm",), logdir=tmp_path)
    result = results["arms"]["trl-vllm"]
    check_arm(result)
    assert "GRPOTrainer.sync_weights" in result["profile_median_s"]
    assert len(result["vllm_logp_difference_mean"]) == step_vs_trl.SMOKE.steps
