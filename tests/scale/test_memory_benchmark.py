"""Smoke run of benchmarks/memory.py: every phase is measured and a token budget splits the update."""

from __future__ import annotations

import math

from scale_helpers import one_thread

from benchmarks import memory


def test_memory_benchmark_smoke():
    with one_thread():
        results = memory.run(smoke=True)
    rows = results["rows"]
    assert [r["token_budget"] for r in rows] == [None, 64]
    for row in rows:
        assert all(math.isfinite(row["mib"][p]) and row["mib"][p] >= 0 for p in memory.PHASES), row
        assert row["peak_mib"]["update"] > 0
    whole, budgeted = rows
    assert (
        whole["backward_passes"] == 1 and budgeted["backward_passes"] == 4
    )  # 2 prompts x 2 responses, 1 row per pass
    text = memory.render(results)
    assert "| 2 x 2 | 8 |" in text and "update MiB" in text
