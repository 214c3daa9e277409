"""The ``qoq`` command: LightningCLI runs (fit | validate | test | predict) plus data, export and compare.

Examples:
    qoq fit --config configs/demo.yaml                                 # DRPO on the embedded demo set
    qoq fit --config configs/demo.yaml --config configs/algorithm/grpo.yaml   # the GRPO ablation
    qoq test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
    qoq fit --model qoq.models.ECGEncoder --data qoq.data.ECGDataModule ...   # a component's own stage
    qoq data demo --out ~/.cache/qoq/demo                              # build the demo set only
    qoq compare runs/demo runs/demo-grpo                               # runs side by side
    qoq fit --help | --print_config
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from pathlib import Path
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
    # qoq's run() gives LightningCLI its args and mirrors them in sys.argv for ranks that Lightning spawns
    r".*LightningCLI's args parameter is intended to run from within Python.*",
    # the run logger says itself when it replaces an earlier run's metrics.csv (and keeps it on resume)
    r".*Experiment logs directory .* exists and is not empty.*",
)


#: Errors a user fixes in their config, data or command line: shown as one line unless debugging.
_USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _set_env_defaults() -> None:
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _cli_class(argv: list[str]):
    from jsonargparse import Namespace
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
    from lightning.pytorch.utilities import rank_zero_info

    from qoq import runs
    from qoq.seeds import fill_seeds, write_seeds

    class RunConfig(SaveConfigCallback):
        """Saves the parsed config as ``<root>/config.yaml``, whatever the logger."""

        def save_config(self, trainer, pl_module, stage) -> None:  # noqa: D102 - SaveConfigCallback hook
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, root / self.config_filename, skip_none=False, overwrite=True,
                             multifile=self.multifile)

    class QoQCLI(LightningCLI):
        """LightningCLI whose runs each live in one folder, ``trainer.default_root_dir`` (see :mod:`qoq.runs`).

        Unless a logger is configured, metrics go to ``<root>/metrics.csv`` (:class:`qoq.loggers.RunLogger`;
        a run given ``--ckpt_path`` appends to it), checkpoints to
        ``<root>/checkpoints/``, the parsed config to ``<root>/config.yaml`` and reports to ``<root>/reports/``.
        Unset rollout and data-stream seeds are derived from ``seed_everything`` (:mod:`qoq.seeds`), and every
        effective seed goes to ``<root>/seeds.json``.
        """

        def before_instantiate_classes(self) -> None:  # noqa: D102 - LightningCLI hook
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.trainer
            runs.place_logger_files(trainer.logger, trainer.default_root_dir or ".")
            self._seeds = fill_seeds(cfg)  # written once the classes are built (bad settings write nothing)
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
                        flush_logs_every_n_steps=trainer.log_every_n_steps or 50,  # metrics.csv as the run goes
                    ),
                )

        def instantiate_classes(self) -> None:  # noqa: D102 - LightningCLI step
            super().instantiate_classes()
            root = Path(self.trainer.default_root_dir)
            write_seeds(self._seeds, root)
            for callback in self.trainer.checkpoint_callbacks:  # not under the logger's folder
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = os.path.realpath(root / "checkpoints")

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
            if cfg is None:
                return
            self._place_run(cfg)
            if not cfg.get("ckpt_path"):
                return
            cfg.ckpt_path = str(_resolve_checkpoint(cfg.ckpt_path, cfg.trainer.default_root_dir or "."))
            fill_seeds(cfg)  # the checkpoint holds the seeds its run derived from seed_everything
            given = self.config.clone()
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    super()._parse_ckpt_path()  # the checkpoint's model settings over the given ones
            except SystemExit:
                self.config = given
                print(f"qoq {subcommand}: the model settings saved in {cfg.ckpt_path} do not parse with this "
                      "version of qoq (an older checkpoint?); they were not compared, the given ones are used",
                      file=sys.stderr)  # fmt: skip
                return
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

        @staticmethod
        def _place_run(cfg: Namespace) -> None:
            """Give an overlay stack its own run folder (:func:`qoq.runs.overlay_root`), before anything
            (``--ckpt_path last`` included) looks for files in it."""
            trainer = cfg.trainer
            root = runs.overlay_root(trainer.default_root_dir, runs.config_files(cfg), argv)
            if root is not None and root != trainer.default_root_dir:
                rank_zero_info(f"[qoq] run folder: {root} (the overlays' own; --trainer.default_root_dir sets it)")
            trainer.default_root_dir = root

    return QoQCLI, RunConfig


#: Every subcommand and what it does (``qoq --help``).
COMMANDS: dict[str, str] = {
    "fit": "train: RL (DRPO, GRPO, ...), the SFT warm start, or one component's own stage",
    "validate": "score a model on the validation set",
    "test": "evaluate a checkpoint; writes reports/test-step<N>/ (summary.md, plots, traces)",
    "predict": "answer new cases (unlabelled manifest, or one file + question) -> predictions/*.jsonl",
    "data": "the embedded demo set, dataset importers, manifest statistics",
    "export": "a checkpoint -> a Hugging Face model + encoders + model card, reloadable as a Policy",
    "compare": "two or more runs side by side: summaries, reward and per-domain curves",
}

_USAGE = """usage: qoq [-v] COMMAND [options]   (qoq COMMAND --help for a command's options; -v: every library's detail)

commands:
{commands}

examples:
  qoq fit --config configs/demo.yaml                         DRPO on the embedded demo set
  qoq fit --config configs/demo.yaml --config configs/algorithm/grpo.yaml    the GRPO ablation (runs/demo-grpo)
  qoq test --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
  qoq predict --config configs/demo.yaml --ckpt_path runs/demo/checkpoints/last.ckpt \\
      --data.predict.file scan.dcm --data.predict.question "Which view is this?"

the options of one class, with their docstrings (shorter than `qoq fit --help`):
  qoq fit --model.help qoq.systems.PolicyOptimization      also qoq.models.Policy, qoq.models.ECGEncoder, ...
  qoq fit --data.help qoq.data.MultiDomainDataModule
  qoq fit --config configs/demo.yaml --print_config        the fully resolved config
"""


def usage() -> str:
    """The text of ``qoq --help``: every subcommand, examples, where the per-class help is."""
    width = max(map(len, COMMANDS))
    return _USAGE.format(commands="\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()))


def _resolve_checkpoint(ckpt_path: str, root: str) -> Path:
    """``ckpt_path`` as a checkpoint, ``last`` being ``<root>/checkpoints/last.ckpt``; raises if there is none.

    A checkpoint is a file, or a folder of shards (FSDP with ``state_dict_type: sharded``) holding
    ``meta.pt``.
    """
    from pathlib import Path

    if ckpt_path == "last":
        path = Path(root) / "checkpoints" / "last.ckpt"
        if not _is_checkpoint(path):
            raise FileNotFoundError(
                f"--ckpt_path last: no checkpoint to resume in {path.parent} (drop --ckpt_path to start a new run)"
            )
        return path
    path = Path(ckpt_path).expanduser()
    if not _is_checkpoint(path):
        raise FileNotFoundError(f"--ckpt_path {ckpt_path}: no such checkpoint file (or folder of shards)")
    return path


#: The file of a sharded checkpoint folder that holds everything but the weights (Lightning's FSDP layout).
SHARDED_METADATA = "meta.pt"


def _checkpoint_file(path: str | Path) -> Path:
    """The file holding a checkpoint's step and state: the checkpoint itself, or a shard folder's meta.pt."""
    path = Path(path)
    return path / SHARDED_METADATA if path.is_dir() else path


def _is_checkpoint(path: Path) -> bool:
    return _checkpoint_file(path).is_file()


def _checkpoint_step(path: str) -> int:
    """The global step a checkpoint was written at (memory-mapped: the weights are not read)."""
    import torch

    state = torch.load(_checkpoint_file(path), map_location="cpu", weights_only=True, mmap=True)
    return int(state["global_step"])


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

    ``qoq -v COMMAND ...`` prints every library's detail. Config, data and checkpoint errors are printed
    as one line (``qoq fit: error: ...``) and exit with status 2; ``--debug`` anywhere on the command
    line, or ``QOQ_DEBUG=1``, shows the full traceback.
    """
    from qoq import console

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-v", "--verbose"):
        argv = argv[1:]
        os.environ[console.VERBOSE_ENV] = "1"
    debug = "--debug" in argv or os.environ.get("QOQ_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    console.quiet_libraries()
    _set_env_defaults()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"qoq: unknown command {argv[0]!r}{hint}; choose from: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "data":
            from qoq.data.command import main as data_main

            return data_main(argv[1:])
        if argv[0] == "export":
            from qoq.export import main as export_main

            return export_main(argv[1:])
        if argv[0] == "compare":
            from qoq.compare import main as compare_main

            return compare_main(argv[1:])
        run(argv)
    except _USER_ERRORS as error:
        if debug:
            raise
        while isinstance(error.__cause__, _USER_ERRORS):  # jsonargparse wraps a class's own error
            error = error.__cause__
        print(f"qoq {argv[0]}: error: {error}\n(--debug or QOQ_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    return 0


def run(argv: list[str]):
    """Run a LightningCLI command in-process (used by ``main`` and by the end-to-end tests)."""
    from qoq import console

    console.quiet_libraries()
    _set_env_defaults()
    from lightning import LightningDataModule, LightningModule

    for message in _BENIGN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if any(a in ("-h", "--help") or a.endswith(".help") for a in argv):
        # `--help` lists the known subclasses of LightningModule / LightningDataModule: import qoq's
        import qoq.data.datamodules
        import qoq.models
        import qoq.systems  # noqa: F401
    # The arguments are `argv`, not the process's; ranks that Lightning spawns re-run sys.argv, so it
    # must carry them too.
    saved_argv, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        cli, save_config = _cli_class(argv)
        return cli(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=save_config,
            save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
            auto_configure_optimizers=False,
            args=argv,
        )
    finally:
        sys.argv = saved_argv


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
