"""The channel from the RL system to the data module: per-domain statistics of each training step."""

from __future__ import annotations

from typing import Any

import lightning as L


class DomainStatsFeedback(L.Callback):
    """After each training step, hand the step's per-domain statistics to the data module.

    The module publishes them as ``last_domain_stats`` (domain name -> ``{"zero_var_frac", "mean_reward",
    "groups"}``, see :func:`qoq.rl.groups.domain_batch_stats`); a data module that defines
    ``observe_domain_stats(stream_index, stats)`` receives them with the stream index of the batch they
    were measured on (:class:`qoq.data.ClinicalDataModule` uses them in ``sampler: adaptive`` mode and
    ignores them otherwise), and its current sampling probabilities are logged as
    ``train/sample_prob/<domain>``. Anything else is left alone, so the callback is harmless everywhere.

    :class:`qoq.systems.PolicyOptimization` adds it by itself (``configure_callbacks``). Lightning runs it
    before the checkpoint callbacks, so a checkpoint saved after a step includes that step's report.
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stats = getattr(pl_module, "last_domain_stats", None)
        datamodule = getattr(trainer, "datamodule", None)
        observe = getattr(datamodule, "observe_domain_stats", None)
        index = getattr(batch, "stream_index", -1)
        if stats is None or observe is None or index < 0:
            return
        observe(index, stats)
        if getattr(datamodule, "sampler_mode", None) == "adaptive":
            probs = datamodule.domain_probabilities()
            pl_module.log_dict(
                {f"train/sample_prob/{d}": float(p) for d, p in probs.items()},
                on_step=True,
                batch_size=len(batch),
            )


__all__ = ["DomainStatsFeedback"]
