"""Helpers of the benchmark smoke tests, imported as ``bench_helpers`` (pytest puts this folder on
sys.path)."""

from __future__ import annotations

from benchmarks import step_vs_trl


def check_arm(result: dict, settings: step_vs_trl.Settings = step_vs_trl.SMOKE) -> None:
    """Assert that one arm of the step benchmark trained every step and did exactly the expected work."""
    assert "error" not in result, result.get("error")
    assert len(result["step_s"]) == settings.steps and all(t > 0 for t in result["step_s"])
    assert result["eos_disabled"]  # every response ran to the cap: equal work on both sides
    assert result["tokens_per_step"] == settings.prompts * settings.n * settings.max_new_tokens
    assert result["median_step_s"] > 0 and result["tokens_per_s"] > 0
