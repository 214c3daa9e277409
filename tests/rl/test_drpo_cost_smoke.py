"""The DRPO cost benchmark runs in smoke mode and reports what it measured (no timing asserted)."""

from benchmarks.drpo_cost import run


def test_drpo_cost_smoke():
    results = run(smoke=True)
    assert results["rollouts"] == 5 and results["domains"] == 9
    rows = results["rows"]
    assert {row["rewards"] for row in rows} == {"binary", "continuous"}
    for row in rows:
        assert row["history"] == 1_000 and row["cumulative_kept"] == 1_000  # before the timed step
        assert row["window50_kept"] == 50 * 8  # the window holds 50 steps of 8 prompts
        assert row["cumulative_s"] > 0 and row["window50_s"] > 0
        assert row["ratio"] == row["cumulative_cpu_s"] / row["window50_cpu_s"]
