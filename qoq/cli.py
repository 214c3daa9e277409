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
    # evaluation metrics are synced by torchmetrics before they are logged
    r".*It is recommended to use `self.log\('(val|test)/.*sync_dist=True.*",
)


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
        Unset rollout and data-stream seeds are derived from ``seed_everything`` (:mod:`qoq.seeds`), and every
        effective seed goes to ``<root>/seeds.json``.
        """

        def before_instantiate_classes(self) -> None:  # noqa: D102 - LightningCLI hook
            from qoq.seeds import fill_seeds, write_seeds

            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.trainer
            write_seeds(fill_seeds(cfg), trainer.default_root_dir or ".")
            if trainer.logger in (None, True):
                trainer.logger = Namespace(
                    class_path="qoq.loggers.RunLogger",
                    init_args=Namespace(
                        save_dir=trainer.default_root_dir or ".",
                        name="",
                        version="",
                        keep_existing=bool(cfg.get("ckpt_path")),
                    ),
                )

        def _parse_ckpt_path(self) -> None:  # patched by the lead: see LEAD_NOTE_READ_ME.md (main has the full fix)
            given = self.config.clone()
            super()._parse_ckpt_path()
            if self.config.get("subcommand") != "fit":
                self.config = given

    return QoQCLI


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qoq`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _set_env_defaults()
    if argv and argv[0] == "data":
        from qoq.data.command import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "export":
        from qoq.export import main as export_main

        return export_main(argv[1:])
    run(argv)
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
