"""The run folder: one per config stack, and everything a run writes inside it, whatever the logger.

``trainer.default_root_dir`` is the run folder. Its ``config.yaml``, ``checkpoints/``, ``engine/``,
``reward_curve.*``, ``rollouts.jsonl``, ``reports/`` and ``predictions/`` do not move with the logger, and
a logger that keeps local files (W&B offline, MLflow's file store, TensorBoard) keeps them inside it too.

Overlays get their own folder: a config file that does not set ``trainer.default_root_dir``, layered on
one that does, appends its name (``--config configs/demo.yaml --config configs/algorithm/grpo.yaml`` runs
in ``runs/demo-grpo``), so an ablation never overwrites the run it varies. ``fit``, ``test`` and
``predict`` with the same stack find the same folder; ``--trainer.default_root_dir`` on the command line
is taken as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

#: Logger classes (by name) -> the folder inside the run folder their local files go to.
_LOGGER_DIRS: dict[str, str] = {
    "WandbLogger": ".",  # wandb adds wandb/
    "MLFlowLogger": "mlflow.db",  # and mlartifacts/
    "TensorBoardLogger": "tensorboard",
    "CometLogger": "comet",
    "NeptuneLogger": "neptune",
}
#: save_dir values that mean "not chosen" (the loggers' own defaults: the current directory).
_UNCHOSEN = (None, "", ".", "./", "./mlruns", "mlruns", "lightning_logs")


def _sets_root(config_file: str) -> bool:
    try:
        data = yaml.safe_load(Path(config_file).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    trainer = data.get("trainer") if isinstance(data, dict) else None
    return isinstance(trainer, dict) and "default_root_dir" in trainer


def overlay_root(root: str | None, config_files: Sequence[str], argv: Sequence[str]) -> str | None:
    """The run folder of a config stack: ``root`` plus the names of the overlays after the file that set it.

    Args:
        root: the parsed ``trainer.default_root_dir``.
        config_files: the ``--config`` files, in order.
        argv: the command line (a ``--trainer.default_root_dir`` there wins as given).

    Returns:
        ``root`` or ``root-<overlay>-<overlay>...``.
    """
    if root is None or any(a.startswith("--trainer.default_root_dir") for a in argv):
        return root
    overlays: list[str] = []
    based = False
    for path in config_files:
        if _sets_root(path):
            based, overlays = True, []
        elif based:
            overlays.append(Path(path).name.split(".")[0])
    return "-".join([str(root).rstrip("/"), *overlays]) if overlays else root


def place_logger_files(logger_cfg: Any, root: str) -> None:
    """Point each configured logger's local files into the run folder, unless a place was chosen.

    Args:
        logger_cfg: ``trainer.logger`` as parsed (a class_path namespace, a list of them, or a bool).
        root: the run folder.
    """
    for entry in logger_cfg if isinstance(logger_cfg, list) else [logger_cfg]:
        class_path = getattr(entry, "class_path", None) or ""
        sub = _LOGGER_DIRS.get(class_path.rsplit(".", 1)[-1])
        init = getattr(entry, "init_args", None)
        if sub is None or init is None:
            continue
        if class_path.endswith("MLFlowLogger") and (init.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")):
            continue  # a tracking server: nothing local
        if class_path.endswith("MLFlowLogger"):
            # a database in the run folder: MLflow's file store is deprecated, and it cannot hold both
            # `train/reward` and `train/reward/<domain>` (a file and a folder of one name)
            folder = os.path.abspath(root)
            init["tracking_uri"] = f"sqlite:///{os.path.join(folder, 'mlflow.db')}"
            init["artifact_location"] = init.get("artifact_location") or os.path.join(folder, "mlartifacts")
        elif init.get("save_dir") in _UNCHOSEN:
            init["save_dir"] = os.path.normpath(os.path.join(root, sub))


def config_files(cfg: Any) -> list[str]:
    """The ``--config`` files of a parsed config, as paths."""
    out = []
    for item in cfg.get("config") or []:
        path = getattr(item, "absolute", None) or getattr(item, "relative", None) or item
        out.append(os.fspath(path))
    return out


__all__ = ["config_files", "overlay_root", "place_logger_files"]
