"""Smoke run of the phases benchmark: a real `qoq fit` of the demo writes every phase timer."""

from __future__ import annotations

from benchmarks import phases


def test_phases_smoke():
    results = phases.run(smoke=True)
    (run,) = results["runs"]
    assert "error" not in run, run.get("error")
    assert run["steps"] == phases.SMOKE.steps
    assert set(run["phases"]) >= set(phases.PHASES)
    assert abs(sum(p["share"] for p in run["phases"].values()) - 1) < 0.2  # medians of parts ~ median of sums
    assert "| rollout |" in phases.render(results)
