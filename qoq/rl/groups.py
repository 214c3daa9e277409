"""Group statistics: the one home of per-group means, stds, spreads and zero-variance groups.

Conventions of :mod:`qoq.rl`: ``rewards [N]``, ``group_ids [N]`` (any integers; the responses of one
prompt share an id; groups may differ in size), ``domain_ids [N]`` (constant within a group). Group stds
are unbiased (n - 1); so is the batch std. A group is *zero-variance* when its reward spread
(max - min) is at most ``tol``: it carries no group-relative signal.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def check_inputs(rewards: Tensor, group_ids: Tensor, domain_ids: Tensor | None = None) -> None:
    """Raise ValueError unless rewards / group_ids (/ domain_ids) are all ``[N]`` and rewards are finite."""
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if domain_ids is not None and domain_ids.shape != rewards.shape:
        raise ValueError(f"domain_ids must be [N] like rewards; got {tuple(domain_ids.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")


def group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-response group index ``[N]`` (0..G-1), group sizes, means and sums ``[G]`` (float64)."""
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    uniq, index = torch.unique(group_ids, return_inverse=True)  # [G], [N] in 0..G-1
    r = rewards.double()
    groups = uniq.numel()
    counts = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, index, torch.ones_like(r))
    sums = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)  # [G]
    return index, counts, sums / counts, sums


def group_std(rewards: Tensor, index: Tensor, counts: Tensor, means: Tensor) -> Tensor:
    """``[G]`` unbiased per-group std (0 for groups of one response)."""
    dev = rewards.double() - means[index]  # [N]
    ss = torch.zeros_like(means).index_add_(0, index, dev * dev)  # [G]
    return (ss / (counts - 1).clamp(min=1)).sqrt()


def group_spread(rewards: Tensor, index: Tensor, groups: int) -> Tensor:
    """``[G]`` max - min reward of each group (float64)."""
    r = rewards.double()
    hi = torch.full((groups,), -math.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, index, r, "amax")
    lo = torch.full((groups,), math.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, index, r, "amin")
    return hi - lo


def group_domains(index: Tensor, groups: int, domain_ids: Tensor) -> Tensor:
    """``[G]`` the domain of each group; raises if a group spans two domains."""
    d = domain_ids.long()
    lo = torch.full((groups,), torch.iinfo(torch.long).max, dtype=torch.long, device=d.device)
    hi = torch.full((groups,), torch.iinfo(torch.long).min, dtype=torch.long, device=d.device)
    lo = lo.scatter_reduce(0, index, d, "amin")
    hi = hi.scatter_reduce(0, index, d, "amax")
    if not bool((lo == hi).all()):
        raise ValueError("responses of the same prompt (group id) carry different domain ids")
    return lo


def batch_std(x: Tensor) -> Tensor:
    """Unbiased std of a vector; 0 for fewer than two entries."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def standardize(x: Tensor, eps: float, center: bool = False) -> Tensor:
    """``x / (std(x) + eps)`` (unbiased batch std), after subtracting the batch mean when ``center``."""
    if center:
        x = x - x.mean()
    scale = batch_std(x) + eps
    return x / scale if bool(scale > 0) else torch.zeros_like(x)


def per_domain_mean(values: Tensor, domain_ids: Tensor) -> dict[int, Tensor]:
    """Domain id -> mean of ``values [N]`` over that domain's responses (float64, CPU)."""
    uniq, inverse = torch.unique(domain_ids, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64, device=values.device).index_add_(0, inverse, values.double())
    counts = torch.bincount(inverse, minlength=len(uniq)).double()
    means = (sums / counts.to(sums.device)).cpu()
    return {int(d): means[j] for j, d in enumerate(uniq.tolist())}


def lookup(keys: Tensor, table: Mapping[int, float]) -> Tensor:
    """``[N]`` float64: ``table[keys[i]]`` (one Python step per distinct key, not per row)."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    values = torch.tensor([float(table[k]) for k in uniq.tolist()], dtype=torch.float64, device=keys.device)
    return values[inverse]


def filter_zero_variance(rewards: Tensor, group_ids: Tensor, tol: float = 0.0) -> Tensor:
    """Which groups carry a learning signal (DAPO's dynamic-sampling filter; Yu et al. 2025, 2503.14476).

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        tol: largest reward spread still counted as "all equal".

    Returns:
        ``keep [G]`` bool, one per distinct group id in ascending order (``torch.unique(group_ids)``);
        ``keep[torch.unique(group_ids, return_inverse=True)[1]]`` is the per-response mask.
    """
    check_inputs(rewards, group_ids)
    index, counts, _, _ = group_stats(rewards, group_ids)
    return group_spread(rewards, index, len(counts)) > tol


def zero_variance_fraction(rewards: Tensor, group_ids: Tensor, tol: float = 1e-8) -> Tensor:
    """``[]`` float32: the share of groups whose reward spread is at most ``tol``."""
    return (~filter_zero_variance(rewards, group_ids, tol)).float().mean()


def zero_adv_frac(advantages: Tensor) -> dict[str, Tensor]:
    """``{"zero_adv_frac": share of responses with advantage exactly 0}`` (every estimator reports it)."""
    return {"zero_adv_frac": (advantages == 0).float().mean().detach()}


def domain_batch_stats(
    rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, tol: float = 0.0
) -> dict[int, dict[str, float]]:
    """Per-domain statistics of one step, the input of :meth:`AdaptiveDomainSampler.update`.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        domain_ids: ``[N]`` domain id of each response (constant within a group).
        tol: reward spread counted as zero variance.

    Returns:
        domain id -> ``{"zero_var_frac": share of the domain's groups with no reward spread,
        "mean_reward": mean reward of its responses, "groups": number of its groups}``.
    """
    check_inputs(rewards, group_ids, domain_ids)
    index, counts, _, _ = group_stats(rewards, group_ids)
    domain_of = group_domains(index, len(counts), domain_ids)  # [G]
    flat = (group_spread(rewards, index, len(counts)) <= tol).double()  # [G]
    zero_frac = per_domain_mean(flat, domain_of)
    mean_reward = per_domain_mean(rewards, domain_ids)
    uniq, n = torch.unique(domain_of, return_counts=True)
    groups = dict(zip(uniq.tolist(), n.tolist()))
    return {
        d: {"zero_var_frac": float(zero_frac[d]), "mean_reward": float(mean_reward[d]), "groups": int(groups[d])}
        for d in sorted(groups)
    }


__all__ = [
    "batch_std",
    "check_inputs",
    "domain_batch_stats",
    "filter_zero_variance",
    "group_domains",
    "group_spread",
    "group_stats",
    "group_std",
    "lookup",
    "per_domain_mean",
    "standardize",
    "zero_adv_frac",
    "zero_variance_fraction",
]
