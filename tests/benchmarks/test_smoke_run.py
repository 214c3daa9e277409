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


def test_run_includes_the_memory_benchmark():
    from benchmarks import run

    assert "memory" in run.BENCHMARKS and "memory" in run.TIMEOUTS
    results = {
        "grid": {"lm": {"hidden_size": 64}},
        "rows": [
            {"prompts": 2, "n": 2, "length": 8, "token_budget": None, "device": "cpu", "backward_passes": 1,
             "mib": {"rollout": 1.0, "logprobs": 2.0, "update": 3.0},
             "peak_mib": {"rollout": 10.0, "logprobs": 20.0, "update": 30.0}},
        ],
    }
    record = {"name": "memory", "wall_s": 5.0, "load_before": (1, 1, 1), "load_after": (1, 1, 1), "results": results}
    text = run.render_section(record, {"memory": record})
    assert text.startswith("## Peak memory per phase") and "| 2 x 2 | 8 |" in text
