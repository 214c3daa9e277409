"""Bad settings and bad data stop ``qoq`` in its first seconds with one clear line (exit status 2), before
any data or weights are built; ``--debug`` brings the traceback back."""

from __future__ import annotations

from pathlib import Path

import pytest

from qoq.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--config", str(ROOT / "configs/demo.yaml"), "--config", str(ROOT / "configs/smoke.yaml")]


def _error(capsys, *args: str) -> str:
    assert main(["fit", *SMOKE, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "(--debug or QOQ_DEBUG=1 shows the traceback)"
    return err[-2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.sampling.n", "1"], "sampling.n=1: group-relative advantages"),
        (["--model.init_args.sampling.n", "0"], "SamplingParams.n must be >= 1, got 0"),
        (["--model.init_args.optimizer.init_args.lr", "-0.1"],
         "PolicyOptimization: optimizer.init_args.lr=-0.1 must be > 0"),
        (["--model.init_args.init_policy_from", "missing.ckpt"], "init_policy_from: no checkpoint at missing.ckpt"),
        (["--ckpt_path", "missing.ckpt"], "--ckpt_path missing.ckpt: no such checkpoint file"),
    ],
)
def test_bad_settings_are_one_line(tmp_path, capsys, args, message):
    line = _error(capsys, "--trainer.default_root_dir", str(tmp_path), *args)
    assert line.startswith("qoq fit: error: ") and message in line
    assert not any(tmp_path.iterdir()), "nothing may be written before the settings are checked"


def test_unknown_reward_name_is_one_line(tmp_path, capsys):
    reward = '{"class_path": "qoq.rl.rewards.RewardFn", "init_args": {"weights": {"accuracy": 1, "acuracy": 1}}}'
    line = _error(capsys, "--trainer.default_root_dir", str(tmp_path), "--model.init_args.reward", reward)
    assert "unknown reward components ['acuracy']" in line


def test_bad_manifest_is_one_line_naming_the_line(tmp_path, capsys):
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"id": "a"}\n')
    args = ["--trainer.default_root_dir", str(tmp_path / "run"), "--data.init_args.demo", "false"]
    line = _error(capsys, *args, "--data.init_args.manifests", f"[{manifest}]")
    assert line.startswith(f"qoq fit: error: {manifest}:1: ")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="lr=-0.1"):
        lr = "--model.init_args.optimizer.init_args.lr"
        main(["fit", *SMOKE, "--trainer.default_root_dir", str(tmp_path), lr, "-0.1", "--debug"])
