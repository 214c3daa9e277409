"""`python -m benchmarks.run --smoke` end to end on the cheapest benchmark: it writes a RESULTS.md."""

from __future__ import annotations

from benchmarks import common


def test_run_writes_results(tmp_path):
    results = tmp_path / "RESULTS.md"
    proc = common.run_module(
        "benchmarks.run",
        ["--smoke", "--only", "drpo_cost", "--results", str(results), "--workdir", str(tmp_path / "work")],
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = results.read_text()
    assert "# qoq benchmark results" in text and "**smoke mode**" in text
    assert "## DRPO cost per step vs history length" in text and "**Failed**" not in text
    assert "| prompts | rewards | history |" in text
    assert (tmp_path / "work" / "drpo_cost.json").is_file()
