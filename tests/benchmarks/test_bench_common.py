"""The benchmarks' shared helpers and renderers (fast: no engines started except one tiny HF engine)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from benchmarks import common, phases, run, step_vs_trl


def test_toy_reward_is_the_vowel_share_of_letters():
    assert common.toy_reward("Abc de!") == pytest.approx(2 / 5)  # letters a b c d e: vowels a, e
    assert common.toy_reward("123 !?") == 0.0
    assert common.toy_reward("") == 0.0


def test_text_reward_matches_toy_reward_per_text():
    out = common.TextReward()(["aaa", "xyz", "ab"], [None, None, None])
    assert out.total.tolist() == pytest.approx([1.0, 0.0, 0.5])
    assert out.errors == 0 and out.components == {}


def test_prompt_batch_is_text_only():
    batch = common.prompt_batch(["q1", "q2", "q3"])
    assert len(batch) == 3 and batch.modalities == {}
    assert batch.domain_ids.tolist() == [0, 0, 0]
    assert batch.targets[0].labels == common.LABELS


def test_intervals_and_median():
    assert common.intervals([1.5, 2.0, 4.0], start=1.0) == pytest.approx([0.5, 0.5, 2.0])
    assert common.median([3.0, 1.0, 2.0]) == 2.0
    assert math.isnan(common.median([]))


def test_markdown_table_and_cells():
    text = common.markdown_table([{"a": 1.23456, "b": None, "c": True}, {"a": 12345.0, "b": "x", "c": False}])
    assert text.splitlines() == [
        "| a | b | c |",
        "|---|---|---|",
        "| 1.23 | - | yes |",
        "| 12,345 | x | no |",
    ]
    assert common.markdown_table([]) == "_(no rows)_\n"
    assert common.fmt(float("nan")) == "-" and common.fmt(0.0) == "0" and common.fmt(25_000) == "25,000"


def test_machine_info_names_cores_and_versions():
    info = common.machine_info()
    assert info["cores"] >= 1
    assert "torch" in info["versions"] and "transformers" in info["versions"]


def test_bench_site_without_install_raises_when_missing(tmp_path: Path):
    reqs = tmp_path / "bench.txt"
    reqs.write_text("nothing==0\n")
    with pytest.raises(RuntimeError, match="not installed"):
        common.bench_site(reqs, tmp_path / "site-packages", install=False)


def test_without_eos_runs_every_response_to_the_cap():
    from qoq.rl.rollout import HFEngine
    from qoq.types import SamplingParams

    policy = common.tiny_policy_lm(
        {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}
    ).build()
    with torch.no_grad():
        embeds = [e.detach() for e in policy.prompt_embeds(common.prompt_batch(common.PROMPTS[:1]))]
        first = policy.lm(inputs_embeds=embeds[0][None]).logits[0, -1].argmax().item()  # greedy first token
    greedy = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    plain, capped = HFEngine(), common.without_eos(HFEngine())
    for engine in (plain, capped):  # the greedy first token is made the EOS: a plain engine stops at once
        engine.setup(policy.lm, policy.tokenizer, Path("."), suppress_token_ids=(), eos_token_ids=[first])
    assert plain.generate(embeds, greedy).response_mask.sum(-1).tolist() == [1]
    out = capped.generate(embeds, greedy)
    assert capped.eos_disabled
    assert out.response_mask.sum(-1).tolist() == [6] and first not in out.response_ids.flatten().tolist()


def test_read_phases_and_summarize(tmp_path: Path):
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,step,time/rollout,time/update,train/reward\n"
        "0,0,9.0,1.0,0.5\n"  # warm-up step, left out
        "0,1,3.0,1.0,0.5\n"
        "0,2,,,0.1\n"  # a row of other metrics only
        "0,3,1.0,1.0,0.5\n"
        "0,4,2.0,2.0,0.5\n"
    )
    steps = phases.read_phases(csv)
    assert steps == [
        {"rollout": 9.0, "update": 1.0},
        {"rollout": 3.0, "update": 1.0},
        {"rollout": 1.0, "update": 1.0},
        {"rollout": 2.0, "update": 2.0},
    ]
    summary = phases.summarize(steps)
    # kept steps: totals 4, 2, 4 -> median 4; rollout median 2 (share 0.5), update median 1 (share 0.25)
    assert summary["median_step_s"] == 4.0 and summary["kept"] == 3
    assert summary["phases"]["rollout"] == {"median_s": 2.0, "share": 0.5}
    assert summary["phases"]["update"] == {"median_s": 1.0, "share": 0.25}
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,step,train/reward\n0,0,1\n")
    with pytest.raises(ValueError, match="bad.csv"):
        phases.read_phases(bad)


def _step_vs_trl_results() -> dict:
    arm = {
        "params": 100,
        "prompt_tokens": [10, 12],
        "median_step_s": 0.5,
        "first_step_s": 2.0,
        "setup_s": 1.0,
        "tokens_per_step": 64.0,
        "tokens_per_s": 128.0,
        "eos_disabled": True,
        "torch_threads": 2,
    }
    return {
        "settings": {
            "lm": {},
            "prompts": 2,
            "n": 2,
            "max_new_tokens": 16,
            "steps": 3,
            "warmup": 1,
            "lr": 1e-5,
        },
        "arms": {
            "qoq-hf": {**arm, "phase_median_s": {"rollout": 0.25}},
            "trl-hf": {**arm, "median_step_s": 1.0},
            "trl-vllm": {"error": "exit code 1:\nboom"},
        },
        "ratios": {"hf": 0.5},
        "target_ratio": 0.7,
    }


def test_render_step_vs_trl_shows_ratio_verdict_and_errors():
    text = step_vs_trl.render(_step_vs_trl_results())
    assert "qoq / TRL median step time = **0.50x** (meets the target <= 0.7x)" in text
    assert "qoq-hf phases (median s): rollout 0.250" in text
    assert "trl-vllm **failed**" in text and "boom" in text


def test_render_results_writes_machine_sections_and_drpo_share():
    records = [
        {
            "name": "step_vs_trl",
            "wall_s": 10.0,
            "load_before": (1.0, 1.0, 1.0),
            "load_after": (2.0, 1.0, 1.0),
            "results": _step_vs_trl_results(),
        },
        {
            "name": "phases",
            "wall_s": 5.0,
            "load_before": None,
            "load_after": None,
            "results": {
                "settings": {"steps": 3, "overlay": "x: 1\n"},
                "runs": [
                    {
                        "variant": "vllm",
                        "command": "qoq fit",
                        "wall_s": 5.0,
                        "steps": 3,
                        "kept": 2,
                        "median_step_s": 2.0,
                        "phases": {"advantage": {"median_s": 0.02, "share": 0.01}},
                    }
                ],
            },
        },
        {
            "name": "drpo_cost",
            "wall_s": 1.0,
            "load_before": None,
            "load_after": None,
            "results": {"step_seconds": 2.0, "rows": [{"history": 1000, "ratio": 2.5}]},
        },
        {"name": "rollout", "wall_s": 1.0, "load_before": None, "load_after": None, "error": "timed out"},
    ]
    info = {
        "cpu": "CPU X",
        "cores": 2,
        "memory_gib": 8.0,
        "platform": "linux",
        "python": "3.11",
        "versions": {"torch": "2.13"},
        "commit": "abc",
        "load_average": (0.5, 0.5, 0.5),
    }
    text = run.render_results(records, info, "python -m benchmarks.run", smoke=False, wall_s=60.0)
    assert "CPU X, 2 cores" in text and "torch 2.13" in text and "Command: `python -m benchmarks.run`" in text
    for title in ("qoq GRPO step vs TRL GRPOTrainer", "Phases of a demo RL step", "DRPO cost per step"):
        assert f"## {title}" in text
    assert "| 1000 | 2.5 |" in text
    assert "the advantage phase took 20.0 ms = 1.0% of the step" in text
    assert "**Failed**" in text and "timed out" in text
