"""What one RL step reports: its logged metrics, its rollout trace and its per-domain statistics.

Plain functions of an :class:`~qoq.systems.experience.Experience`; the system only logs their result.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from qoq.rl.groups import domain_batch_stats, zero_variance_fraction
from qoq.systems.dynamic_sampling import Collected
from qoq.systems.experience import Experience, domain_id

#: ``(group_ids [N], {name: [N]}) -> (group_ids [M], {name: [M]})`` over every rank.
Gather = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]


def step_logs(
    exp: Experience,
    update_metrics: dict[str, Tensor],
    sync_seconds: float,
    timers: dict[str, float],
    domain_names: dict[int, str],
    domain_stats: dict[str, dict[str, float]] | None = None,
    seen: set[str] | None = None,
) -> dict[str, Any]:
    """The step's ``train/*``, ``time/*`` and ``time_share/*`` values (tensors or floats).

    Args:
        exp: the step's experience (advantages set).
        update_metrics: the PPO loop's mean loss metrics.
        sync_seconds: the weight sync's wall time.
        timers: wall time per phase.
        domain_names: domain id -> key, to name the estimator's per-domain metrics.
        domain_stats: :func:`domain_stats` of the step (logged as ``train/zero_var_frac/<domain>``).
        seen: every name logged on earlier steps (updated): those absent now are logged as NaN, or
            Lightning's result collection would repeat a domain's last value on steps without it.
    """
    logs = _reward_logs(exp)
    logs["train/sync_ms"] = sync_seconds * 1000.0
    if exp.rollout.truncated is not None:
        logs["train/truncated_frac"] = exp.rollout.truncated.float().mean()
    for name, values in exp.scored.components.items():
        finite = values[torch.isfinite(values)]
        if finite.numel():
            logs[f"train/reward_{name}"] = finite.mean()
    for k, v in update_metrics.items():
        logs[f"train/{k}"] = v
    logs.update(_domain_logs(exp))
    logs.update(advantage_logs(exp.advantage_metrics, domain_names))
    logs.update(_mismatch_logs(exp))
    logs.update({f"train/{k}": v for k, v in exp.generated.metrics.items()})  # dynamic sampling
    logs.update({f"train/zero_var_frac/{d}": s["zero_var_frac"] for d, s in (domain_stats or {}).items()})
    logs.update(_time_logs(timers))
    if seen is not None:
        seen.update(logs)
        logs.update({k: float("nan") for k in seen - logs.keys()})
    return logs


def _reward_logs(exp: Experience) -> dict[str, Any]:
    rewards = exp.rewards
    return {
        "train/reward": rewards.mean(),
        "train/response_length": exp.rollout.response_mask.sum(-1).float().mean(),
        "train/reward_errors": float(exp.scored.errors),
        "train/zero_std_groups": zero_variance_fraction(rewards, exp.rollout.prompt_index),
    }


def _domain_logs(exp: Experience) -> dict[str, Any]:
    """Mean reward and mean |advantage| per clinical domain of the batch."""
    by_domain: dict[str, list[int]] = defaultdict(list)
    for row, i in enumerate(exp.rollout.prompt_index.tolist()):
        by_domain[exp.batch.domains[i]].append(row)
    logs: dict[str, Any] = {}
    rewards = exp.rewards
    for domain, rows in by_domain.items():
        idx = torch.tensor(rows, device=rewards.device)
        logs[f"train/reward/{domain}"] = rewards[idx].mean()
        logs[f"train/adv_scale/{domain}"] = exp.advantages[idx].abs().mean()
    return logs


def advantage_logs(metrics: dict[str, Any], domain_names: dict[int, str]) -> dict[str, float]:
    """The estimator's scalar metrics as ``train/advantage/<name>[/<domain>]`` (per-domain dicts unrolled)."""
    logs: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        per_domain = v.items() if isinstance(v, dict) else [(None, v)]
        for dom, value in per_domain:
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                name = k if dom is None else f"{k}/{metric_key(dom, domain_names)}"
                logs[f"train/advantage/{name}"] = float(value)
    return logs


def metric_key(key: Any, domain_names: dict[int, str]) -> str:
    """A metric's name part for a domain id (its key when known), or a tuple of them."""
    if isinstance(key, tuple):
        return "/".join(metric_key(k, domain_names) for k in key)
    if isinstance(key, int) and key in domain_names:
        return domain_names[key]
    return str(key)


def _mismatch_logs(exp: Experience) -> dict[str, Any]:
    """How far the engine's log-probs are from the trainer's old log-probs (mean, max over tokens)."""
    if exp.rollout.engine_logprobs is None:
        return {}
    old = exp.old.logp
    diff = (exp.rollout.engine_logprobs.to(old) - old).abs()[exp.rollout.response_mask]
    if not diff.numel():
        return {}
    return {"train/logp_mismatch_mean": diff.mean(), "train/logp_mismatch_max": diff.max()}


def _time_logs(timers: dict[str, float]) -> dict[str, float]:
    logs = {f"time/{k}": v for k, v in timers.items()}
    total = sum(timers.values())
    if total > 0:
        logs.update({f"time_share/{k}": v / total for k, v in timers.items()})
    return logs


def domain_stats(generated: Collected, gather: Gather, tol: float, device: Any = None) -> dict[str, dict[str, float]]:
    """Per clinical domain name, over every group generated this step on every rank: zero-variance group
    share, mean reward and group count (what the adaptive sampler reads).

    Args:
        generated: the step's collection (``generated_rewards / _groups / _domains``).
        gather: ``(group_ids, {name: values}) -> (group_ids, values)`` of every rank
            (:func:`qoq.strategies.gather_groups`).
        tol: reward spread counted as zero variance.
        device: where the values are gathered (the module's device).
    """
    from qoq.data.domains import DOMAINS

    groups, values = gather(generated.generated_groups.to(device), {
        "rewards": generated.generated_rewards.to(device, torch.float32),
        "domains": generated.generated_domains.to(device),
    })  # fmt: skip
    stats = domain_batch_stats(values["rewards"].cpu(), groups.cpu(), values["domains"].cpu(), tol=tol)
    names = {domain_id(d): d for d in DOMAINS}
    return {names.get(d, str(d)): s for d, s in stats.items()}


def trace_rows(exp: Experience, step: int) -> list[dict[str, Any]]:
    """One row per response: prompt id, domain, dataset, response, reward, components, advantage."""
    batch, scored = exp.batch, exp.scored
    return [
        {
            "step": step,
            "prompt_id": batch.ids[i],
            "domain": batch.domains[i],
            "dataset": batch.datasets[i],
            "response": exp.rollout.texts[row],
            "reward": float(scored.total[row]),
            "components": {k: float(v[row]) for k, v in scored.components.items()},
            "advantage": float(exp.advantages[row]),
        }
        for row, i in enumerate(exp.rollout.prompt_index.tolist())
    ]


__all__ = ["advantage_logs", "domain_stats", "metric_key", "step_logs", "trace_rows"]
