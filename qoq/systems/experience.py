"""What one RL step trains on (:class:`Experience`), and the one domain id every part of the step uses.

Domain ids: :func:`domain_ids` is the only place a prompt's domain becomes an integer: the CRC-32 of its
domain key, ``"ct"`` (``by="domain"``, the paper) or ``"ct/dataset"`` (``by="dataset"``, the released code).
The same on every rank and in every run, so DRPO's history, the logged metrics and the statistics handed
to the adaptive sampler agree; ``names`` maps ids back to keys. (``PromptBatch.domain_ids``, the data
module's index into :data:`qoq.data.domains.DOMAINS`, stays a data-side detail.)
"""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from qoq.rl.advantages import AdvantageInputs
from qoq.rl.rewards import RewardOutput
from qoq.systems.update import OldLogprobs
from qoq.types import PromptBatch, RolloutBatch

if TYPE_CHECKING:
    from qoq.systems.dynamic_sampling import Collected

DomainKey = Literal["domain", "dataset"]


def domain_key(domain: str, dataset: str, by: DomainKey) -> str:
    """The key a prompt is grouped by: its domain, or ``domain/dataset``."""
    return domain if by == "domain" else f"{domain}/{dataset}"


def domain_id(key: str) -> int:
    """The stable id of a domain key (CRC-32): identical on every rank and in every run."""
    return zlib.crc32(key.encode())


def domain_ids(batch: PromptBatch, by: DomainKey, names: dict[int, str] | None = None) -> Tensor:
    """``[P]`` long: the domain id of each prompt; ``names`` (if given) gets id -> key of each."""
    keys = [domain_key(d, s, by) for d, s in zip(batch.domains, batch.datasets, strict=True)]
    ids = [domain_id(k) for k in keys]
    if names is not None:
        names.update(zip(ids, keys, strict=True))
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class Experience:
    """One training step's data, filled in the order of the step.

    Attributes:
        batch: the P prompts trained on.
        rollout: their N responses (``prompt_index [N]`` into ``batch``).
        scored: rewards, ``total [N]`` and ``components {name: [N]}``.
        embeds: P prompt embeddings ``[L_i, H]`` (no grad).
        domain_ids: ``[N]`` domain id of each response (:func:`domain_ids`).
        generated: every group generated in the step (kept or not), for the domain statistics.
        plan: the update's response rows per epoch and mini-batch (:func:`qoq.systems.update.mini_batch_plan`).
        ref_logp: ``[N, R]`` reference log-probs, or None (no KL term, no damping).
        old: old log-probs known before the update.
        kl: ``[N]`` per-response KL(sampling policy || reference) for DRPO's damping, or None.
        advantages: ``[N]``.
        advantage_metrics: the estimator's diagnostics.
    """

    batch: PromptBatch  # P prompts
    rollout: RolloutBatch  # N = P x n responses
    scored: RewardOutput  # total [N], components {name: [N]}
    embeds: list[Tensor]  # P x [L_i, H]
    domain_ids: Tensor  # [N] long
    generated: Collected
    plan: list[list[Tensor]]  # [epoch][mini-batch] -> [n_mb] rows
    ref_logp: Tensor | None = None  # [N, R]
    old: OldLogprobs | None = None  # logp [N, R], known [N], behaviour [N, R] | None
    kl: Tensor | None = None  # [N]
    advantages: Tensor | None = None  # [N]
    advantage_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def rewards(self) -> Tensor:
        """``[N]`` float32 total rewards on the responses' device."""
        return self.scored.total.to(self.rollout.response_ids.device, torch.float32)


def advantage_inputs(
    exp: Experience, weights: dict[str, float], gather: Callable[[Tensor, dict[str, Tensor]], Any]
) -> AdvantageInputs:
    """The estimator's inputs over the global batch: ``gather`` (:func:`qoq.strategies.gather_groups`)
    brings every rank's rows, rank by rank, with disjoint group ids."""
    kl = exp.kl if exp.kl is not None else torch.zeros_like(exp.rewards)
    device = exp.rewards.device
    comps = {f"component/{k}": v.to(device, torch.float32) for k, v in exp.scored.components.items()}
    groups, v = gather(exp.rollout.prompt_index, {"rewards": exp.rewards, "domains": exp.domain_ids, "kl": kl, **comps})
    components = {k.removeprefix("component/"): x for k, x in v.items() if k.startswith("component/")}
    return AdvantageInputs(v["rewards"], groups, v["domains"], v["kl"] if exp.kl is not None else None, components,
                           weights)  # fmt: skip


class Clock:
    """Accumulates wall time per phase into ``timers``: ``with clock("rollout"): ...``."""

    def __init__(self) -> None:
        self.timers: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - start


__all__ = ["Clock", "DomainKey", "Experience", "advantage_inputs", "domain_id", "domain_ids", "domain_key"]
