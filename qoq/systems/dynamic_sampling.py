"""Collecting one training step's rollouts, optionally with DAPO-style dynamic sampling.

Without dynamic sampling a step trains on the rollouts of its batch. With it (Yu et al. 2025, "DAPO",
arXiv 2503.14476), groups whose rewards are all equal (no group-relative signal) are dropped and more
prompts are drawn and rolled out until the step has as many informative groups as its batch has prompts,
or a cap of generation batches is reached. The filter is :class:`qoq.rl.balancing.DynamicSamplingBuffer`;
this module only moves prompts, responses and rewards around.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from qoq.rl.balancing import DynamicSamplingBuffer
from qoq.rl.rewards import RewardOutput
from qoq.types import PromptBatch, RolloutBatch

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
        generated_domains: ``[M]`` their domain ids (``PromptBatch.domain_ids``).
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


def _response_domains(batch: PromptBatch, rollout: RolloutBatch) -> Tensor:
    return batch.domain_ids.to(rollout.prompt_index.device)[rollout.prompt_index]


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
            rows = torch.nonzero(keep).flatten()
            chosen = torch.unique(rollout.prompt_index.cpu()[rows]).tolist()  # kept prompts, ascending
            remap = torch.full((len(prompts),), -1, dtype=torch.long)
            remap[chosen] = torch.arange(len(chosen))
            sub_rollout = rollout.select(rows, remap[rollout.prompt_index.cpu()[rows]])
            kept.append((prompts.select(chosen), sub_rollout, select_reward(scored, rows),
                         [embeds[i] for i in chosen]))  # fmt: skip
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
    merged_batch = PromptBatch.concat([b for b, *_ in kept])
    merged_rollout = RolloutBatch.concat([(r, off) for (_, r, _, _), off in zip(kept, offsets)], pad_id)
    merged_scored = concat_rewards([s for _, _, s, _ in kept])
    merged_embeds = [e for *_, es in kept for e in es]
    return Collected(merged_batch, merged_rollout, merged_scored, merged_embeds, buffer.batches,
                     buffer.num_groups, metrics=metrics, **generated)  # fmt: skip


__all__ = ["Collected", "DynamicSampling", "collect_dynamic", "collect_plain", "concat_rewards", "select_reward"]
