"""Every shipped YAML parses through the real CLI (``--print_config``), alone or layered on the demo.

Parsing is cheap by design: heavy construction happens in ``configure_model``, never in ``__init__``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from qoq.cli import run

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# Files that are whole run configs (they name a model and a data module) are parsed alone; overlays
# (algorithm/, trainer/, rollout/, ...) are layered on the demo; component files (policy/, data/) are
# given to the option they configure.
COMPONENT_OPTIONS = {"policy": "--model.init_args.policy", "data": "--data"}


def _all_yamls() -> list[Path]:
    files = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "experiments").rglob("*.yaml"))
    assert files, "no configs found"
    return files


def _argv(path: Path) -> list[str]:
    content = yaml.safe_load(path.read_text()) or {}
    if "model" in content and "class_path" in content["model"] and "data" in content:
        return ["--config", str(path)]
    kind = path.parent.name
    if kind in COMPONENT_OPTIONS and "class_path" in content:
        return ["--config", str(DEMO), COMPONENT_OPTIONS[kind], str(path)]
    return ["--config", str(DEMO), "--config", str(path)]


@pytest.mark.parametrize("path", _all_yamls(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run(["fit", *_argv(path), "--print_config"])
    assert exit_info.value.code in (0, None), out.getvalue()
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["class_path"]
    assert printed["data"]["class_path"]


def test_algorithm_swap_is_one_file() -> None:
    """The GRPO ablation changes the advantage estimator and nothing else."""

    def printed(*extra: str) -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            run(["fit", "--config", str(DEMO), *extra, "--print_config"])
        return yaml.safe_load(out.getvalue())

    drpo = printed("--config", str(ROOT / "configs/algorithm/drpo.yaml"))
    grpo = printed("--config", str(ROOT / "configs/algorithm/grpo.yaml"))
    assert drpo["model"]["init_args"]["advantage"]["class_path"] == "qoq.rl.advantages.DRPO"
    assert grpo["model"]["init_args"]["advantage"]["class_path"] == "qoq.rl.advantages.GRPO"
    drpo["model"]["init_args"].pop("advantage")
    grpo["model"]["init_args"].pop("advantage")
    assert drpo == grpo
