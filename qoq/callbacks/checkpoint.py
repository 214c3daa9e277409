"""The run checkpoint: ``<run>/checkpoints/last.ckpt``, rewritten every few steps and at the end."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt`` of a run current: every ``every_n_train_steps`` steps and at the final step.

    A killed run loses at most ``every_n_train_steps`` steps and resumes exactly from ``--ckpt_path last``.
    Lightning's ``ModelCheckpoint`` writes ``last.ckpt`` at the end of training only when it has written
    no checkpoint before, so with periodic saving the steps after the last multiple were lost; this one
    always leaves the final step.

    Args:
        every_n_train_steps: steps between checkpoints (0: only at the end of training).
        save_top_k: also keep this many step-named checkpoints (0: only ``last.ckpt``; -1: every one).
        save_last: write ``last.ckpt``.
        enable_version_counter: False overwrites a re-run's ``last.ckpt`` instead of writing ``last-v1.ckpt``
            beside it (which a later ``--ckpt_path last`` would not pick).
        kwargs: further ``ModelCheckpoint`` arguments.
    """

    def __init__(
        self,
        every_n_train_steps: int = 10,
        save_top_k: int = 0,
        save_last: bool = True,
        enable_version_counter: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            every_n_train_steps=every_n_train_steps,
            save_top_k=save_top_k,
            save_last=save_last,
            enable_version_counter=enable_version_counter,
            **kwargs,
        )

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: D102 - Lightning hook
        super().on_train_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
