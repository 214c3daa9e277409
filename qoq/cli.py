"""The ``qoq`` command: LightningCLI runs (fit | validate | test | predict) plus data tools.

Examples:
    qoq fit --config configs/demo.yaml                                 # DRPO on the embedded demo set
    qoq fit --config configs/demo.yaml --config configs/algorithm/grpo.yaml   # the GRPO ablation
    qoq test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
    qoq fit --model qoq.models.ECGEncoder --data qoq.data.ECGDataModule ...   # a component's own stage
    qoq data demo --out ~/.cache/qoq/demo                              # build the demo set only
    qoq fit --help | --print_config
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

_ENV_DEFAULTS = {
    # vLLM on CPU: a 1 GiB KV cache and an in-process engine (ENVIRONMENT.md); harmless elsewhere.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_LOGGING_LEVEL": "WARNING",
    # Nothing is fetched from a hub at run time: users point configs at local weights.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}


# Warnings that say nothing actionable about a qoq run.
_BENIGN_WARNINGS = (
    r".*module\(s\) in eval mode at the start of training.*",  # the frozen reference policy
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*IterableDataset.*has `__len__` defined.*",
    r".*litlogger.*",
    # RunCheckpoint saves after the RL step's update: exactly the state a resumed run continues from
    r".*ModelCheckpoint with manual optimization and every_n_train_steps.*",
    # evaluation metrics are synced by torchmetrics before they are logged
    r".*It is recommended to use `self.log\('(val|test)/.*sync_dist=True.*",
)


#: Errors a user fixes in their config, data or command line: shown as one line unless debugging.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _set_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _cli_class():
    from jsonargparse import Namespace
    from lightning.pytorch.cli import LightningCLI

    class QoQCLI(LightningCLI):
        """LightningCLI whose runs each live in one folder, ``trainer.default_root_dir``.

        Unless a logger is configured, metrics go to ``<root>/metrics.csv`` (:class:`qoq.loggers.RunLogger`;
        a run given ``--ckpt_path`` appends to it), checkpoints to
        ``<root>/checkpoints/``, the parsed config to ``<root>/config.yaml`` and reports to ``<root>/reports/``.
        """

        def before_instantiate_classes(self) -> None:  # noqa: D102 - LightningCLI hook
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.trainer
            if trainer.logger in (None, True):
                resuming = self.subcommand == "fit" and cfg.get("ckpt_path")
                trainer.logger = Namespace(
                    class_path="qoq.loggers.RunLogger",
                    init_args=Namespace(
                        save_dir=trainer.default_root_dir or ".",
                        name="",
                        version="",
                        keep_existing=bool(cfg.get("ckpt_path")),
                        resume_step=_checkpoint_step(cfg.ckpt_path) if resuming else None,
                        flush_logs_every_n_steps=trainer.log_every_n_steps or 50,
                    ),
                )

        def _parse_ckpt_path(self) -> None:
            """Resolve ``--ckpt_path`` and hold the run's settings against the checkpoint's.

            ``last`` means ``<default_root_dir>/checkpoints/last.ckpt`` and must exist (never a silent
            restart at step 0). The settings on the command line are the ones used: a resumed ``fit``
            whose model settings differ from the checkpoint's is refused with the differences listed
            (to change them, start a new run from its weights with ``init_policy_from``);
            ``validate`` / ``test`` / ``predict`` apply the given settings and print the differences.
            """
            subcommand = self.config.get("subcommand")
            cfg = self.config[subcommand] if subcommand else None
            if cfg is None or not cfg.get("ckpt_path"):
                return
            cfg.ckpt_path = str(_resolve_checkpoint(cfg.ckpt_path, cfg.trainer.default_root_dir or "."))
            given = self.config.clone()
            super()._parse_ckpt_path()  # the checkpoint's model settings over the given ones
            differences = _differences(given[subcommand].get("model"), self.config[subcommand].get("model"))
            self.config = given
            if not differences:
                return
            listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in differences)
            if subcommand == "fit":
                raise ValueError(
                    f"--ckpt_path {cfg.ckpt_path}: the model settings differ from the checkpoint's ({listed}). "
                    "Resume with the checkpoint's settings, or start a new run from its weights with "
                    "--model.init_args.init_policy_from"
                )
            print(f"qoq {subcommand}: using the given model settings, not the checkpoint's: {listed}", file=sys.stderr)

    return QoQCLI


def _resolve_checkpoint(ckpt_path: str, root: str) -> Path:
    """``ckpt_path`` as a file, ``last`` being ``<root>/checkpoints/last.ckpt``; raises if there is none."""
    from pathlib import Path

    if ckpt_path == "last":
        path = Path(root) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint to resume in {path.parent} (drop --ckpt_path to start a new run)"
            )
        return path
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    return path


def _checkpoint_step(path: str) -> int:
    """The global step a checkpoint was written at (memory-mapped: the weights are not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _differences(given: Any, saved: Any, prefix: str = "model") -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, given value)`` for every leaf where two parsed configs differ."""
    from jsonargparse import Namespace

    if isinstance(given, Namespace):
        given = given.as_dict()
    if isinstance(saved, Namespace):
        saved = saved.as_dict()
    if isinstance(given, dict) and isinstance(saved, dict):
        out = []
        for key in sorted(set(given) | set(saved), key=str):
            out += _differences(given.get(key), saved.get(key), f"{prefix}.{key}")
        return out
    if isinstance(given, (list, tuple)) and isinstance(saved, (list, tuple)):
        given, saved = list(given), list(saved)
    return [] if given == saved else [(prefix, saved, given)]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qoq`` console script.

    Config, data and checkpoint errors are printed as one line (``qoq fit: error: ...``) and exit with
    status 2; ``--debug`` anywhere on the command line, or ``QOQ_DEBUG=1``, shows the full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("QOQ_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    _set_env_defaults()
    try:
        if argv and argv[0] == "data":
            from qoq.data.command import main as data_main

            return data_main(argv[1:])
        if argv and argv[0] == "export":
            from qoq.export import main as export_main

            return export_main(argv[1:])
        run(argv)
    except _USER_ERRORS as error:
        if debug:
            raise
        while isinstance(error.__cause__, _USER_ERRORS):  # jsonargparse wraps a class's own error
            error = error.__cause__
        command = f"qoq {argv[0]}" if argv and not argv[0].startswith("-") else "qoq"
        print(f"{command}: error: {error}\n(--debug or QOQ_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]):
    """Run a LightningCLI command in-process (used by ``main`` and by the end-to-end tests)."""
    _set_env_defaults()
    from lightning import LightningDataModule, LightningModule

    for message in _BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    # The arguments are `argv`, not the process's; ranks that Lightning spawns re-run sys.argv, so it
    # must carry them too.
    saved_argv, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        return _cli_class()(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=argv,
        )
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
