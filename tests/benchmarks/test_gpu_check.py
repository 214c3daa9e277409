"""The GPU check's dry run (what runs where there is no CUDA): its wheel list, wheel-folder check, the
configs of every stage through the real CLI, the commands it would run and one tiny CPU measurement."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import common, gpu_check


def _lock() -> dict[str, str]:
    text = (common.ROOT / "requirements" / "lock-cpu.txt").read_text()
    pins = re.findall(r"^([A-Za-z0-9._-]+)==([^,\s]+)", text, flags=re.MULTILINE)
    return {gpu_check._norm(name): version for name, version in pins}


def test_the_wheel_list_pins_the_locked_versions():
    pins = gpu_check.read_wheel_list()
    assert {"jsonargparse", "pydicom", "pydicom-data", "nibabel", "wfdb", "sleepecg"} <= set(pins)
    lock = _lock()
    assert {name: lock.get(name) for name in pins} == pins


def test_a_bad_wheel_list_names_its_line(tmp_path):
    path = tmp_path / "wheels.txt"
    path.write_text("# comment\njsonargparse==4.53.0\npydicom>=3\n")
    with pytest.raises(ValueError, match=r"wheels.txt:3: 'pydicom>=3' is not 'name==version'"):
        gpu_check.read_wheel_list(path)
    path.write_text("wfdb==4.3.1\nWFDB==4.3.1\n")
    with pytest.raises(ValueError, match="wheels.txt:2: WFDB is listed twice"):
        gpu_check.read_wheel_list(path)


def test_the_wheel_folder_check_finds_missing_wrong_duplicate_and_unlisted(tmp_path):
    pins = {"pydicom": "3.0.2", "wfdb": "4.3.1", "docstring-parser": "0.18.0", "sleepecg": "0.6.0"}
    for name in (
        "pydicom-3.0.2-py3-none-any.whl",
        "docstring_parser-0.18.0-py3-none-any.whl",
        "wfdb-4.3.0-py3-none-any.whl",
        "sleepecg-0.6.0-cp311-abi3-manylinux_2_28_x86_64.whl",
        "sleepecg-0.5.9-cp311-abi3-manylinux_2_28_x86_64.whl",
        "extra-1.0-py3-none-any.whl",
    ):
        (tmp_path / name).touch()
    problems = gpu_check.check_wheel_folder(pins, tmp_path)
    assert problems == [
        "wfdb: wheel 4.3.0, pinned 4.3.1",
        "sleepecg: 2 wheels (0.5.9, 0.6.0); keep one",
        "extra: wheel not in gpu-wheels.txt",
    ]
    (tmp_path / "wfdb-4.3.0-py3-none-any.whl").unlink()
    assert "wfdb==4.3.1: no wheel in" in gpu_check.check_wheel_folder(pins, tmp_path)[0]


def test_the_budget_bounds_every_stage():
    budget = gpu_check.Budget(100)
    assert budget.limit("install") == gpu_check.STAGE_CAPS["install"]
    assert 80 < budget.limit("throughput") <= 100 - gpu_check.RESERVE_S


def test_dry_run_checks_its_plumbing_and_writes_json_and_markdown(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [str(out), "--dry-run", "--wheels", str(tmp_path / "no-wheels"), "--workdir", str(work)]
    code = gpu_check.main(argv)
    results = json.loads((out / "gpu_check.json").read_text())
    assert code == 0, results["stages"]
    assert results["mode"] == "dry-run"
    assert set(results["stages"]) == set(gpu_check.STAGES)
    assert all(stage["ok"] for stage in results["stages"].values())
    policy = "qoq.models.qwen_vl.QwenVLPolicy"
    assert all(results["stages"][s]["policy"] == policy for s in ("drpo_fit", "fsdp", "vllm"))
    (row,) = results["stages"]["throughput"]["rows"]
    assert row["params"] > 0 and row["rollout_tok_s"] > 0 and row["train_tok_s"] > 0 and row["eos_disabled"]
    rank0, rank1 = results["commands"]["fsdp"]
    assert rank0[rank0.index("--node_rank") + 1] == "0" and rank1[rank1.index("--node_rank") + 1] == "1"
    assert {"--no-index", "--no-deps", "--target"} <= set(results["commands"]["install"])
    markdown = (out / "gpu_check.md").read_text()
    assert "| drpo_fit | ok |" in markdown and "training tok/s" in markdown
    assert (out / "gpu_check.log").is_file()
