"""Collecting one training step's rollouts, optionally with DAPO-style dynamic sampling.

Without dynamic sampling a step trains on the rollouts of its batch. With it (Yu et al. 2025, "DAPO",
arXiv 2503.14476), groups whose rewards are all equal (no group-relative signal) are dropped and more
prompts are drawn and rolled out until the step has as many informative groups as its batch has prompts,
or a cap of generation batches is reached. The filter is :class:`DynamicSamplingBuffer`
(groups from :func:`qoq.rl.groups.filter_zero_variance`); the rest moves prompts, responses and rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from qoq.rl.groups import filter_zero_variance
from qoq.rl.rewards import RewardOutput
from qoq.systems.experience import domain_ids
from qoq.types import PromptBatch, RolloutBatch, SamplingParams

#: One generation: a prompt batch -> its prompt embeddings (P x [L_i, H]), rollouts and rewards.
Generate = Callable[[PromptBatch, int], tuple[list[Tensor], RolloutBatch, RewardOutput]]
#: The k-th extra prompt batch (k = 1, 2, ...) of the step.
Draw = Callable[[int], PromptBatch]


@dataclass
class DynamicSampling:
    """DAPO-style dynamic sampling: drop zero-variance groups, refill from the data stream.

    Args:
        max_gen_batches: most generation batches per training step, the step's own batch included; a step
            still short of informative groups then trains on those it has.
        tol: largest reward spread of a group still counted as zero variance.
    """

    max_gen_batches: int = 3
    tol: float = 0.0

    def __post_init__(self) -> None:
        if self.max_gen_batches < 1:
            raise ValueError(f"DynamicSampling: max_gen_batches must be >= 1, got {self.max_gen_batches}")
        if self.tol < 0:
            raise ValueError(f"DynamicSampling: tol must be >= 0, got {self.tol}")


@dataclass
class Collected:
    """What a training step trains on, and what it generated to get there.

    Attributes:
        batch: the prompts trained on (P' of them).
        rollout: their responses; ``prompt_index`` indexes ``batch``.
        scored: the responses' rewards.
        embeds: P' prompt embeddings ``[L_i, H]`` (no grad), for the old log-probs.
        gen_batches: generation batches used.
        kept_groups: groups trained on (P' with dynamic sampling; the batch's prompts otherwise).
        generated_rewards: ``[M]`` rewards of every generated response (kept or not).
        generated_groups: ``[M]`` their group ids (distinct across generation batches).
        generated_domains: ``[M]`` their clinical domain ids (:func:`qoq.systems.experience.domain_ids`).
        metrics: ``gen_batches``, ``kept_groups`` and ``informative_group_frac`` (dynamic sampling only).
    """

    batch: PromptBatch
    rollout: RolloutBatch
    scored: RewardOutput
    embeds: list[Tensor]
    gen_batches: int = 1
    kept_groups: int = 0
    generated_rewards: Tensor = field(default_factory=lambda: torch.zeros(0))
    generated_groups: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    generated_domains: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    metrics: dict[str, float] = field(default_factory=dict)


class DynamicSamplingBuffer:
    """Collects groups with a reward spread across generation batches, up to ``target_groups`` (DAPO).

    Use per training step::

        buf = DynamicSamplingBuffer(target_groups=P, max_batches=4)
        while not buf.done:
            rewards, group_ids = ...  # one generation batch
            keep = buf.add(rewards, group_ids)  # [N] responses of this batch to keep
        buf.rewards(), buf.group_ids(), buf.batches

    Kept groups are taken in ascending group-id order within a batch; once the target is reached the
    rest of that batch's informative groups are dropped (as DAPO does).

    Attributes:
        batches: generation batches added since the last :meth:`reset`.
        num_groups: groups collected.
        groups_seen: groups in all added batches; ``groups_informative``: those with a reward spread.

    Args:
        target_groups: groups to collect (the training batch's prompts).
        max_batches: stop after this many generation batches even if short (None: no limit).
        tol: reward spread counted as zero variance.
    """

    def __init__(self, target_groups: int, max_batches: int | None = None, tol: float = 0.0):
        if target_groups < 1:
            raise ValueError(f"target_groups must be >= 1, got {target_groups}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.target_groups, self.max_batches, self.tol = target_groups, max_batches, tol
        self.reset()

    def reset(self) -> None:
        """Empty the buffer (start of a training step)."""
        self.batches = 0
        self.groups_seen = 0
        self.groups_informative = 0
        self.num_groups = 0
        self._rewards: list[Tensor] = []
        self._groups: list[Tensor] = []

    @property
    def full(self) -> bool:
        """True once ``target_groups`` groups are collected."""
        return self.num_groups >= self.target_groups

    @property
    def done(self) -> bool:
        """True when full, or when ``max_batches`` generation batches have been used."""
        return self.full or (self.max_batches is not None and self.batches >= self.max_batches)

    def add(self, rewards: Tensor, group_ids: Tensor) -> Tensor:
        """Take one generation batch; returns the ``[N]`` bool mask of its responses that were kept.

        Args:
            rewards: ``[N]`` rewards of this generation batch.
            group_ids: ``[N]`` prompt ids within this batch.
        """
        if self.full:
            raise RuntimeError("DynamicSamplingBuffer is full; call reset() before adding")
        keep_group = filter_zero_variance(rewards, group_ids, self.tol)  # [G]
        self.batches += 1
        self.groups_seen += len(keep_group)
        self.groups_informative += int(keep_group.sum())
        room = self.target_groups - self.num_groups
        rank = torch.cumsum(keep_group.long(), 0)  # [G] 1-based rank among kept groups
        keep_group = keep_group & (rank <= room)
        _, index = torch.unique(group_ids, return_inverse=True)
        keep = keep_group[index]  # [N]
        if bool(keep.any()):
            new_id = self.num_groups + torch.cumsum(keep_group.long(), 0) - 1  # [G] id among all kept groups
            self._rewards.append(rewards[keep])
            self._groups.append(new_id[index][keep])
            self.num_groups += int(keep_group.sum())
        return keep

    def rewards(self) -> Tensor:
        """``[M]`` rewards of the kept responses, in the order they were added."""
        return torch.cat(self._rewards) if self._rewards else torch.zeros(0)

    def group_ids(self) -> Tensor:
        """``[M]`` contiguous group ids 0..num_groups-1 of the kept responses, in order of collection."""
        return torch.cat(self._groups) if self._groups else torch.zeros(0, dtype=torch.long)

    def metrics(self) -> dict[str, float]:
        """``gen_batches`` used and ``informative_group_frac`` (groups with a reward spread / groups seen)."""
        return {
            "gen_batches": float(self.batches),
            "informative_group_frac": self.groups_informative / self.groups_seen if self.groups_seen else 0.0,
        }


def _response_domains(batch: PromptBatch, rollout: RolloutBatch) -> Tensor:
    return domain_ids(batch, "domain").to(rollout.prompt_index.device)[rollout.prompt_index]


def generator(
    policy: Any, engine: Any, reward: Any, sampling: SamplingParams, step: int, device: Any, clock: Any
) -> Generate:
    """The step's :data:`Generate`: embed the prompts, roll out (moved to ``device``), score.

    With a sampling seed, each step and each generation of a step gets a distinct seed.

    Args:
        policy: the policy (``prompt_embeds``).
        engine: the rollout engine (``generate``).
        reward: the reward function.
        sampling: the training sampling settings.
        step: the global step.
        device: where the rollouts go.
        clock: ``clock(name)`` context timing the "rollout" and "reward" phases.
    """

    def generate(prompts: PromptBatch, k: int) -> tuple[list[Tensor], RolloutBatch, RewardOutput]:
        params = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + step + 1_000_003 * k)
        with clock("rollout"):
            with torch.no_grad():
                embeds = policy.prompt_embeds(prompts)  # P x [L_i, H]
            rollout = engine.generate([e.detach() for e in embeds], params)
            moved = {n: v.to(device) for n, v in vars(rollout).items() if isinstance(v, Tensor)}
            rollout = replace(rollout, **moved)
        with clock("reward"):
            scored = reward(rollout.texts, [prompts.targets[i] for i in rollout.prompt_index.tolist()])
        return embeds, rollout, scored

    return generate


def collect(
    batch: PromptBatch, generate: Generate, settings: DynamicSampling | None, draw: Draw | None, pad_id: int
) -> Collected:
    """:func:`collect_plain` without dynamic-sampling ``settings``, else :func:`collect_dynamic`."""
    if settings is None:
        return collect_plain(batch, generate)
    if draw is None:
        raise ValueError("dynamic_sampling draws more prompts from the data module's extra_batch(stream_index, draw); "
                         "fit with a qoq data module (e.g. qoq.data.MultiDomainDataModule)")  # fmt: skip
    return collect_dynamic(batch, generate, draw, settings, pad_id)


def collect_plain(batch: PromptBatch, generate: Generate) -> Collected:
    """One generation of the step's batch, trained on as is."""
    embeds, rollout, scored = generate(batch, 0)
    return Collected(
        batch,
        rollout,
        scored,
        embeds,
        gen_batches=1,
        kept_groups=len(batch),
        generated_rewards=scored.total,
        generated_groups=rollout.prompt_index,
        generated_domains=_response_domains(batch, rollout),
    )


def select_reward(scored: RewardOutput, rows: Tensor) -> RewardOutput:
    """The rewards of the given response rows (error counts and messages are kept whole)."""
    rows = rows.to(scored.total.device)
    comps = {k: v[rows.to(v.device)] for k, v in scored.components.items()}
    return RewardOutput(scored.total[rows], comps, scored.errors, list(scored.error_messages))


def concat_rewards(parts: list[RewardOutput]) -> RewardOutput:
    """The rewards of several generations, in order (components present in every part)."""
    if len(parts) == 1:
        return parts[0]
    names = set.intersection(*(set(p.components) for p in parts))
    return RewardOutput(
        torch.cat([p.total for p in parts]),
        {k: torch.cat([p.components[k] for p in parts]) for k in sorted(names)},
        sum(p.errors for p in parts),
        [m for p in parts for m in p.error_messages][:10],
    )


def collect_dynamic(
    batch: PromptBatch, generate: Generate, draw: Draw, settings: DynamicSampling, pad_id: int
) -> Collected:
    """Generate for ``batch``, keep its groups with a reward spread, refill with more prompts until the
    step has ``len(batch)`` informative groups or ``settings.max_gen_batches`` generations were made.

    Kept groups are taken in prompt order, generation by generation; groups beyond the target are
    dropped (DAPO). If no generation gave a single informative group, the step trains on its own batch
    as is (every group-relative advantage is then 0; the KL term still acts), so every step has rows.

    Args:
        batch: the step's batch (from the stream).
        generate: ``(prompts, k) -> (embeds, rollout, rewards)`` for the k-th generation (k = 0 first).
        draw: ``k -> prompts`` of the k-th extra batch (k >= 1).
        settings: the cap and the zero-variance tolerance.
        pad_id: pads the responses of generations of different lengths.

    Returns:
        The kept prompts, responses, rewards and embeddings, with the generation metrics.
    """
    buffer = DynamicSamplingBuffer(len(batch), max_batches=settings.max_gen_batches, tol=settings.tol)
    kept: list[tuple[PromptBatch, RolloutBatch, RewardOutput, list[Tensor]]] = []
    first: tuple[PromptBatch, RolloutBatch, RewardOutput, list[Tensor]] | None = None
    rewards, groups, domains = [], [], []
    group_offset = 0
    prompts = batch
    for k in range(settings.max_gen_batches):
        if k > 0:
            prompts = draw(k)
        embeds, rollout, scored = generate(prompts, k)
        if first is None:
            first = (prompts, rollout, scored, embeds)
        rewards.append(scored.total)
        groups.append(rollout.prompt_index + group_offset)
        domains.append(_response_domains(prompts, rollout))
        group_offset += len(prompts)
        keep = buffer.add(scored.total.detach().cpu(), rollout.prompt_index.cpu())  # [N] bool
        if bool(keep.any()):
            kept.append(_kept_part(prompts, rollout, scored, embeds, keep))
        if buffer.done:
            break
    assert first is not None
    metrics = {**buffer.metrics(), "kept_groups": float(buffer.num_groups)}
    generated = dict(
        generated_rewards=torch.cat(rewards),
        generated_groups=torch.cat([g.to(rewards[0].device) for g in groups]),
        generated_domains=torch.cat([d.to(rewards[0].device) for d in domains]),
    )
    if not kept:
        prompts, rollout, scored, embeds = first
        return Collected(prompts, rollout, scored, embeds, buffer.batches, 0, metrics=metrics, **generated)
    offsets = [0]
    for b, *_ in kept[:-1]:
        offsets.append(offsets[-1] + len(b))
    merged_rollout = RolloutBatch.concat([(r, off) for (_, r, _, _), off in zip(kept, offsets)], pad_id)
    return Collected(PromptBatch.concat([b for b, *_ in kept]), merged_rollout,
                     concat_rewards([s for _, _, s, _ in kept]), [e for *_, es in kept for e in es],
                     buffer.batches, buffer.num_groups, metrics=metrics, **generated)  # fmt: skip


def _kept_part(
    prompts: PromptBatch, rollout: RolloutBatch, scored: RewardOutput, embeds: list[Tensor], keep: Tensor
) -> tuple[PromptBatch, RolloutBatch, RewardOutput, list[Tensor]]:
    """The kept responses ``keep [N]`` of one generation with their prompts (renumbered in order)."""
    rows = torch.nonzero(keep).flatten()
    chosen = torch.unique(rollout.prompt_index.cpu()[rows]).tolist()  # kept prompts, ascending
    remap = torch.full((len(prompts),), -1, dtype=torch.long)
    remap[chosen] = torch.arange(len(chosen))
    sub_rollout = rollout.select(rows, remap[rollout.prompt_index.cpu()[rows]])
    return prompts.select(chosen), sub_rollout, select_reward(scored, rows), [embeds[i] for i in chosen]


__all__ = [
    "Collected",
    "DynamicSampling",
    "DynamicSamplingBuffer",
    "collect",
    "collect_dynamic",
    "collect_plain",
    "concat_rewards",
    "generator",
    "select_reward",
]
