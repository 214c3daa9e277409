"""Smoke run of the qoq-vs-TRL step benchmark: every arm trains and reports its figures (not how fast).

Two test files share the arms so that each stays under a minute: this one runs the three arms that share
a process in smoke mode (qoq with HF and vLLM, TRL with HF); test_smoke_step_vs_trl_vllm.py runs TRL's
colocated vLLM, which needs a process of its own.
"""

from __future__ import annotations

from bench_helpers import check_arm

from benchmarks import step_vs_trl


def test_qoq_and_trl_hf_arms(bench_site, tmp_path):
    results = step_vs_trl.run(smoke=True, arms=("qoq-hf", "qoq-vllm", "trl-hf"), logdir=tmp_path)
    arms = results["arms"]
    for arm in ("qoq-hf", "qoq-vllm", "trl-hf"):
        check_arm(arms[arm])
    # same policy, same prompts on both sides
    assert arms["qoq-hf"]["params"] == arms["trl-hf"]["params"]
    assert arms["qoq-hf"]["prompt_tokens"] == arms["trl-hf"]["prompt_tokens"]
    assert set(arms["qoq-vllm"]["phase_median_s"]) >= {"rollout", "update", "sync"}
    assert results["ratios"]["hf"] > 0
    assert "qoq / TRL median step time" in step_vs_trl.render(results)
