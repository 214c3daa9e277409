"""What one RL step reports: its logged metrics, its rollout trace and its per-domain statistics.

Plain functions of an :class:`~qoq.systems.experience.Experience`; the system only logs their result.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from qoq.rl.groups import domain_batch_stats, zero_variance_fraction
from qoq.systems.experience import Experience


def step_logs(
    exp: Experience,
    update_metrics: dict[str, Tensor],
    sync_seconds: float,
    timers: dict[str, float],
    domain_names: dict[int, str],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The step's ``train/*``, ``time/*`` and ``time_share/*`` values (tensors or floats).

    Args:
        exp: the step's experience (advantages set).
        update_metrics: the PPO loop's mean loss metrics.
        sync_seconds: the weight sync's wall time.
        timers: wall time per phase.
        domain_names: domain id -> key, to name the estimator's per-domain metrics.
        extra: further ``name -> value`` entries, added as they are.
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
    logs.update(extra or {})
    logs.update(_time_logs(timers))
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


def domain_stats(
    rewards: Tensor, groups: Tensor, domains: Tensor, names: dict[int, str], tol: float
) -> dict[str, dict[str, float]]:
    """Per clinical domain name: zero-variance group share, mean reward and group count.

    Args:
        rewards: ``[M]`` rewards of every generated response of the step (all ranks).
        groups: ``[M]`` their group ids.
        domains: ``[M]`` their clinical domain ids.
        names: domain id -> name.
        tol: reward spread counted as zero variance.
    """
    stats = domain_batch_stats(rewards.cpu(), groups.cpu(), domains.cpu(), tol=tol)
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
