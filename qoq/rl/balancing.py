"""Balancing beyond DRPO: per-component normalisation, domain/group reweighting, dynamic filtering.

Three advantage estimators that configs select by ``class_path`` (same protocol as
:mod:`qoq.rl.advantages`; each also accepts the ``components=`` / ``weights=`` keywords the system passes
to estimators that declare ``needs_components``):

- :class:`ComponentNormalized` (GDPO-style): group-normalise each reward component separately, combine
  with the reward weights, batch-standardise.
- :class:`DISCO` (in the spirit of DISCO): scale GRPO scores by a domain-rarity weight and a
  group-uncertainty weight.
- :class:`FairGRPO` (in the spirit of FairGRPO): scale GRPO scores by an adaptive per-group importance
  weight from the group's representation and running reward.

And the pure pieces of DAPO-style dynamic sampling, :func:`filter_zero_variance` and
:class:`DynamicSamplingBuffer`, plus :func:`domain_batch_stats`, the per-domain statistics that
:class:`qoq.data.adaptive.AdaptiveDomainSampler` consumes.

Conventions shared with :mod:`qoq.rl.advantages`: ``rewards [N]``, ``group_ids [N]`` (any integers; the
responses of one prompt share an id; groups may differ in size), ``domain_ids [N]`` (constant within a
group). Group stds are unbiased (n - 1); the final batch standardisation uses the unbiased batch std.
Every estimator here returns finite advantages or raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from qoq.rl.advantages import AdvantageOutput, _batch_std, _group_stats, grpo

# ---------------------------------------------------------------------------------------------- helpers


def _check_inputs(rewards: Tensor, group_ids: Tensor, domain_ids: Tensor | None = None) -> None:
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if domain_ids is not None and domain_ids.shape != rewards.shape:
        raise ValueError(f"domain_ids must be [N] like rewards; got {tuple(domain_ids.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")


def _group_domains(index: Tensor, groups: int, domain_ids: Tensor) -> Tensor:
    """``[G]`` the domain of each group; raises if a group spans two domains."""
    d = domain_ids.long()
    lo = torch.full((groups,), torch.iinfo(torch.long).max, dtype=torch.long, device=d.device)
    hi = torch.full((groups,), torch.iinfo(torch.long).min, dtype=torch.long, device=d.device)
    lo = lo.scatter_reduce(0, index, d, "amin")
    hi = hi.scatter_reduce(0, index, d, "amax")
    if not bool((lo == hi).all()):
        raise ValueError("responses of the same prompt (group id) carry different domain ids")
    return lo


def _group_spread(rewards: Tensor, index: Tensor, groups: int) -> Tensor:
    """``[G]`` max - min reward of each group (float64)."""
    r = rewards.double()
    hi = torch.full((groups,), -math.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, index, r, "amax"
    )
    lo = torch.full((groups,), math.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, index, r, "amin"
    )
    return hi - lo


def _lookup(keys: Tensor, table: Mapping[int, float]) -> Tensor:
    """``[N]`` float64: ``table[keys[i]]`` (one Python step per distinct key, not per row)."""
    uniq, inverse = torch.unique(keys, return_inverse=True)
    values = torch.tensor([float(table[k]) for k in uniq.tolist()], dtype=torch.float64, device=keys.device)
    return values[inverse]


def _standardize(x: Tensor, eps: float, center: bool = False) -> Tensor:
    """``x / (std(x) + eps)`` (unbiased batch std), after subtracting the batch mean when ``center``."""
    if center:
        x = x - x.mean()
    scale = _batch_std(x) + eps
    return x / scale if bool(scale > 0) else torch.zeros_like(x)


def _finite_or_raise(adv: Tensor, name: str) -> Tensor:
    if not bool(torch.isfinite(adv).all()):
        raise FloatingPointError(f"{name} produced non-finite advantages from finite rewards")
    return adv


def _zero_adv_frac(adv: Tensor) -> Tensor:
    return (adv == 0).float().mean().detach()


def _per_domain_mean(values: Tensor, domain_ids: Tensor) -> dict[int, Tensor]:
    """Domain id -> mean of ``values [N]`` over that domain's responses (float64, CPU)."""
    uniq, inverse = torch.unique(domain_ids, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64, device=values.device).index_add_(
        0, inverse, values.double()
    )
    counts = torch.bincount(inverse, minlength=len(uniq)).double()
    means = (sums / counts.to(sums.device)).cpu()
    return {int(d): means[j] for j, d in enumerate(uniq.tolist())}


# ------------------------------------------------------------------- per-component normalisation (GDPO)


def masked_group_zscore(values: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO's group z-score of one reward component, with NaN meaning "does not apply".

    z_i = (v_i - mean_q) / (std_q + eps) where mean_q and the unbiased std_q are taken over the responses
    of group q whose value is not NaN; z_i = 0 where v_i is NaN (and for a group with a single applicable
    response, whose deviation is 0).

    Args:
        values: ``[N]`` component values, NaN where the component does not apply.
        group_ids: ``[N]`` prompt id of each response.
        eps: added to the group std.

    Returns:
        ``[N]`` float64 z-scores.
    """
    index, counts, _, _ = _group_stats(torch.zeros_like(values), group_ids)  # validates shapes
    groups = len(counts)
    ok = ~torch.isnan(values)
    x = torch.where(ok, values.double(), 0.0)  # [N]
    cnt = torch.zeros(groups, dtype=torch.float64, device=x.device).index_add_(0, index, ok.double())  # [G]
    mean = torch.zeros_like(cnt).index_add_(0, index, x) / cnt.clamp(min=1)  # [G]
    dev = torch.where(ok, x - mean[index], 0.0)  # [N]
    std = (torch.zeros_like(cnt).index_add_(0, index, dev * dev) / (cnt - 1).clamp(min=1)).sqrt()  # [G]
    return torch.where(dev != 0, dev / (std[index] + eps), 0.0)


def component_normalized(
    components: Mapping[str, Tensor],
    group_ids: Tensor,
    weights: Mapping[str, float],
    eps: float = 1e-6,
    renormalize: bool = False,
) -> Tensor:
    """Per-component group normalisation, in the manner of GDPO (Liu et al. 2026, arXiv 2601.05242).

    GRPO z-scores the *weighted total*, so different mixes of components can collapse onto the same
    advantage. GDPO normalises each reward separately, sums, and re-normalises over the batch:

    1. z_{c,i} = masked group z-score of component c (:func:`masked_group_zscore`; NaN -> excluded from
       the group's mean/std and z = 0), for every c with w_c != 0;
    2. a_i = sum_c w_c z_{c,i}; with ``renormalize``, a_i *= sum_c w_c / sum_{c applies to i} w_c (the
       re-weighting :class:`~qoq.rl.rewards.RewardFn` applies to a target without a region; 0 when no
       component applies);
    3. A_i = (a_i - mean(a)) / (std(a) + eps) over the whole batch (unbiased std).

    Args:
        components: name -> ``[N]`` component values (NaN where not applicable), e.g.
            ``RewardOutput.components``.
        group_ids: ``[N]`` prompt id of each response.
        weights: name -> weight; components with weight 0 are skipped, components not named are ignored.
        eps: added to the group stds and to the batch std.
        renormalize: rescale each response's sum to the full weight total over the components that apply.

    Returns:
        ``[N]`` advantages, dtype of the first used component.

    Raises:
        ValueError: if a weighted component is missing or not ``[N]``, or no weight is non-zero.
    """
    used = [(c, float(w)) for c, w in weights.items() if float(w) != 0.0]
    if not used:
        raise ValueError(f"component_normalized: no non-zero weight in {dict(weights)}")
    missing = [c for c, _ in used if c not in components]
    if missing:
        raise ValueError(
            f"component_normalized: weighted components {missing} are not in the reward components "
            f"{sorted(components)}"
        )
    dtype = components[used[0][0]].dtype
    total = torch.zeros(group_ids.shape, dtype=torch.float64, device=group_ids.device)  # [N]
    applies = torch.zeros_like(total)  # [N] sum of the weights that apply
    for name, w in used:
        values = components[name].to(group_ids.device)
        if values.shape != group_ids.shape:
            raise ValueError(
                f"component {name!r} has shape {tuple(values.shape)}, expected {tuple(group_ids.shape)}"
            )
        if bool(torch.isinf(values).any()):
            raise ValueError(f"component {name!r} contains inf")
        total += w * masked_group_zscore(values, group_ids, eps)
        applies += torch.where(torch.isnan(values), 0.0, w)
    if renormalize:
        full = sum(w for _, w in used)
        total = torch.where(applies != 0, total * full / torch.where(applies != 0, applies, 1.0), 0.0)
    return _standardize(total, eps, center=True).to(dtype)


class ComponentNormalized:
    """GDPO-style advantages: each reward component group-normalised on its own (see
    :func:`component_normalized`).

    Needs the reward components: the system passes ``components=RewardOutput.components`` and
    ``weights=RewardFn.weights`` to estimators with ``needs_components = True``.

    Args:
        eps: added to the group stds and to the batch std.
        weights: component -> weight for the combination; None uses the weights the caller passes (the
            reward function's own).
        renormalize: rescale each response's combination to the full weight total over the components
            that apply to it (as the total reward does for a target without a region).
    """

    needs_kl = False
    needs_components = True

    def __init__(self, eps: float = 1e-6, weights: dict[str, float] | None = None, renormalize: bool = False):
        self.eps, self.weights, self.renormalize = eps, weights, renormalize

    def __call__(
        self,
        rewards: Tensor,
        group_ids: Tensor,
        domain_ids: Tensor,
        kl: Tensor | None = None,
        components: dict[str, Tensor] | None = None,
        weights: dict[str, float] | None = None,
    ) -> AdvantageOutput:
        _check_inputs(rewards, group_ids, domain_ids)
        if components is None:
            raise ValueError(
                "ComponentNormalized needs components= (RewardOutput.components): the system must pass them "
                "to estimators with needs_components = True"
            )
        use = self.weights if self.weights is not None else weights
        if use is None:
            raise ValueError("ComponentNormalized needs weights: set them in the config or pass weights=")
        adv = component_normalized(components, group_ids, use, self.eps, self.renormalize)
        adv = _finite_or_raise(adv.to(rewards.dtype), "ComponentNormalized")
        metrics: dict[str, Any] = {"zero_adv_frac": _zero_adv_frac(adv)}
        for name, w in use.items():
            if float(w) != 0.0:
                z = masked_group_zscore(components[name].to(group_ids.device), group_ids, self.eps)
                metrics[f"{name}_signal_frac"] = (z != 0).float().mean().detach()
        return AdvantageOutput(adv, metrics)

    def state_dict(self) -> dict[str, Any]:
        """Stateless: an empty dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless: nothing to restore."""


# ---------------------------------------------------------------------------------------------- DISCO


def disco(
    rewards: Tensor,
    group_ids: Tensor,
    domain_ids: Tensor,
    domain_frequency: Mapping[int, float],
    *,
    difficulty_scale: float = 1.0,
    reward_range: tuple[float, float] = (0.0, 1.0),
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Any]]:
    """Domain- and uncertainty-weighted GRPO, in the spirit of DISCO (Zhou et al. 2025, arXiv 2505.15074).

    DISCO scales GRPO by a domain weight (rarer domains up) and a difficulty weight from prompt-level
    self-consistency (uncertain prompts up). qoq's rewards are continuous (IoU), so it measures a group's
    uncertainty by its reward spread instead of answer agreement. What qoq computes:

    1. s_i = GRPO z-score of r_i in its group (:func:`qoq.rl.advantages.grpo`);
    2. w_dom(d) = log(1 + 1 / p_d), p_d = ``domain_frequency[d]`` (log inverse frequency, 1 + so a
       single domain keeps a positive weight);
    3. u_q = sigma_q / sigma_max in [0, 1]: sigma_q the population std of the group's rewards, sigma_max =
       (hi - lo) / 2 the largest std rewards in ``reward_range = (lo, hi)`` can have (binary rewards:
       u = 2 sqrt(p (1 - p)), 1 at p = 1/2); w_diff(q) = 1 + ``difficulty_scale`` * u_q;
    4. A_i = s~_i / (std(s~) + eps) with s~_i = s_i w_dom(d_i) w_diff(q_i) (batch std, unbiased; groups
       keep mean zero).

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        domain_ids: ``[N]`` domain id of each response (constant within a group).
        domain_frequency: domain id -> p_d > 0 for every domain in the batch.
        difficulty_scale: lambda of w_diff (0 disables the difficulty weight).
        reward_range: (lo, hi) bounds of the rewards, for sigma_max.
        eps: GRPO's epsilon and the batch std's.

    Returns:
        ``advantages [N]`` and metrics: per-domain dicts keyed by domain id ``w_dom``, ``w_diff_mean``
        (mean over the domain's responses), plus ``zero_adv_frac``.
    """
    _check_inputs(rewards, group_ids, domain_ids)
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"DISCO: reward_range must be (lo, hi) with hi > lo, got {reward_range}")
    index, counts, means, _ = _group_stats(rewards, group_ids)
    _group_domains(index, len(counts), domain_ids)
    missing = sorted(set(domain_ids.unique().tolist()) - set(domain_frequency))
    if missing:
        raise ValueError(f"DISCO: no frequency for domain ids {missing}")
    dev = rewards.double() - means[index]  # [N]
    sigma = (torch.zeros_like(means).index_add_(0, index, dev * dev) / counts).sqrt()  # [G] population std
    w_diff = 1.0 + difficulty_scale * (sigma / ((hi - lo) / 2)).clamp(max=1.0)  # [G]
    p = _lookup(domain_ids, domain_frequency)  # [N]
    if not bool((p > 0).all()):
        raise ValueError(f"DISCO: domain frequencies must be > 0, got {dict(domain_frequency)}")
    w_dom = torch.log1p(1.0 / p)  # [N]
    s_tilde = grpo(rewards, group_ids, eps).double() * w_dom * w_diff[index]
    adv = _finite_or_raise(_standardize(s_tilde, eps), "DISCO")
    metrics: dict[str, Any] = {
        "w_dom": {d: v.float() for d, v in _per_domain_mean(w_dom, domain_ids).items()},
        "w_diff_mean": {d: v.float() for d, v in _per_domain_mean(w_diff[index], domain_ids).items()},
        "zero_adv_frac": _zero_adv_frac(adv),
    }
    return adv.to(rewards.dtype), metrics


class _DomainCounts:
    """Questions seen per domain id since the start (a checkpointed running count)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def observe(self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor) -> None:
        """Check one batch's inputs and count its questions (groups) per domain."""
        _check_inputs(rewards, group_ids, domain_ids)
        index, counts, _, _ = _group_stats(rewards, group_ids)
        group_domains = _group_domains(index, len(counts), domain_ids).cpu()
        uniq, n = torch.unique(group_domains, return_counts=True)
        for d, c in zip(uniq.tolist(), n.tolist()):
            self.counts[int(d)] = self.counts.get(int(d), 0) + int(c)

    def state_dict(self) -> dict[str, Any]:
        ids = sorted(self.counts)
        return {"domains": ids, "counts": [self.counts[d] for d in ids]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {int(d): int(c) for d, c in zip(state["domains"], state["counts"], strict=True)}


class DISCO:
    """Domain-rarity and group-uncertainty weighted GRPO, in the spirit of DISCO (see :func:`disco`).

    The domain frequency p_d is the share of questions (prompts) of domain d among all questions this
    estimator has seen since the start of training, this batch included (state, checkpointed), so it
    follows the sampler's actual mixture.

    Args:
        difficulty_scale: lambda of the uncertainty weight w_diff = 1 + lambda u_q (0: domain weight only).
        reward_range: (lo, hi) bounds of the total reward (paper weights: (0, 1)).
        eps: GRPO's epsilon and the batch std's.
    """

    needs_kl = False
    needs_components = False

    def __init__(
        self, difficulty_scale: float = 1.0, reward_range: tuple[float, float] = (0.0, 1.0), eps: float = 1e-6
    ):
        if difficulty_scale < 0:
            raise ValueError(f"DISCO: difficulty_scale must be >= 0, got {difficulty_scale}")
        self.difficulty_scale, self.reward_range, self.eps = difficulty_scale, tuple(reward_range), eps
        self.seen = _DomainCounts()

    def __call__(
        self,
        rewards: Tensor,
        group_ids: Tensor,
        domain_ids: Tensor,
        kl: Tensor | None = None,
        components: dict[str, Tensor] | None = None,
        weights: dict[str, float] | None = None,
    ) -> AdvantageOutput:
        self.seen.observe(rewards, group_ids, domain_ids)
        total = sum(self.seen.counts.values())
        frequency = {d: c / total for d, c in self.seen.counts.items()}
        adv, metrics = disco(
            rewards,
            group_ids,
            domain_ids,
            frequency,
            difficulty_scale=self.difficulty_scale,
            reward_range=self.reward_range,
            eps=self.eps,
        )
        metrics["frequency"] = {d: torch.tensor(frequency[d], dtype=torch.float32) for d in metrics["w_dom"]}
        return AdvantageOutput(adv, metrics)

    def state_dict(self) -> dict[str, Any]:
        """Questions seen per domain id."""
        return {"seen": self.seen.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the questions seen per domain id."""
        self.seen.load_state_dict(state["seen"])


# ------------------------------------------------------------------------------------------- FairGRPO


def fairness_weights(
    running_reward: Mapping[int, float],
    seen: Mapping[int, float],
    *,
    alpha: float = 0.5,
    beta: float = 1.0,
    floor: float = 0.05,
) -> dict[int, float]:
    """FairGRPO-style importance weight of each group: w_g = 1 / (N_g^alpha * max(m_g, floor)^beta).

    N_g is the group's representation (questions seen), m_g its running mean reward: rarer and
    worse-performing groups weigh more. alpha = 1/2, beta = 1 give DRPO's domain temperature form
    sqrt(N) * mu with a running reward in place of the cluster difficulty.

    Args:
        running_reward: group id -> m_g.
        seen: group id -> N_g > 0 (same keys).
        alpha: representation exponent (0: ignore representation).
        beta: performance exponent (0: ignore performance).
        floor: lower bound of m_g in the weight (keeps a group scoring 0 finite).

    Returns:
        group id -> w_g (unnormalised: only ratios matter after the batch standardisation).
    """
    if set(running_reward) != set(seen):
        raise ValueError(f"fairness_weights: keys differ: {sorted(running_reward)} vs {sorted(seen)}")
    return {
        g: 1.0 / (float(seen[g]) ** alpha * max(float(running_reward[g]), floor) ** beta)
        for g in running_reward
    }


class FairGRPO:
    """GRPO with adaptive per-group importance weights, in the spirit of FairGRPO (Dai et al. 2025,
    "FairGRPO: Fair Reinforcement Learning for Equitable Clinical Reasoning", arXiv 2510.19893).

    FairGRPO weights advantages by each (demographic) group's representation and difficulty so that
    under-represented and worse-served groups are weighted up. What qoq computes, with g the id in
    ``domain_ids`` (the clinical domain, or any group key the system passes there, e.g. a demographic
    group):

    1. update the state with this batch: N_g += questions of g in the batch; m_g = batch mean reward of
       g's responses on first sight, else m_g = momentum * m_g + (1 - momentum) * batch mean;
    2. w_g = :func:`fairness_weights` (1 / (N_g^alpha max(m_g, floor)^beta));
    3. s~_i = s_i w_{g(i)} with s_i the GRPO z-score; A_i = s~_i / (std(s~) + eps) (batch, unbiased).

    Each group (prompt) keeps mean zero. State (N_g, m_g) is saved by :meth:`state_dict`; under data
    parallelism every rank sees the gathered batch, so the states stay identical.

    Args:
        momentum: EMA factor of the running reward in [0, 1) (0: this batch only).
        alpha: representation exponent.
        beta: performance exponent.
        floor: lower bound of the running reward inside the weight.
        eps: GRPO's epsilon and the batch std's.
    """

    needs_kl = False
    needs_components = False

    def __init__(
        self,
        momentum: float = 0.9,
        alpha: float = 0.5,
        beta: float = 1.0,
        floor: float = 0.05,
        eps: float = 1e-6,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"FairGRPO: momentum must be in [0, 1), got {momentum}")
        if floor <= 0:
            raise ValueError(f"FairGRPO: floor must be > 0, got {floor}")
        self.momentum, self.alpha, self.beta, self.floor, self.eps = momentum, alpha, beta, floor, eps
        self.seen = _DomainCounts()
        self.running_reward: dict[int, float] = {}

    def __call__(
        self,
        rewards: Tensor,
        group_ids: Tensor,
        domain_ids: Tensor,
        kl: Tensor | None = None,
        components: dict[str, Tensor] | None = None,
        weights: dict[str, float] | None = None,
    ) -> AdvantageOutput:
        self.seen.observe(rewards, group_ids, domain_ids)
        batch_mean = _per_domain_mean(rewards, domain_ids)
        for g, m in batch_mean.items():
            m = float(m)
            old = self.running_reward.get(g)
            self.running_reward[g] = m if old is None else self.momentum * old + (1.0 - self.momentum) * m
        w = fairness_weights(
            self.running_reward, self.seen.counts, alpha=self.alpha, beta=self.beta, floor=self.floor
        )
        s_tilde = grpo(rewards, group_ids, self.eps).double() * _lookup(domain_ids, w)
        adv = _finite_or_raise(_standardize(s_tilde, self.eps), "FairGRPO")
        present = sorted(batch_mean)
        mean_w = sum(w[g] for g in present) / len(present)
        metrics: dict[str, Any] = {
            "weight": {g: torch.tensor(w[g] / mean_w, dtype=torch.float32) for g in present},
            "running_reward": {g: torch.tensor(self.running_reward[g], dtype=torch.float32) for g in present},
            "zero_adv_frac": _zero_adv_frac(adv),
        }
        return AdvantageOutput(adv.to(rewards.dtype), metrics)

    def state_dict(self) -> dict[str, Any]:
        """Questions seen and running reward per group id."""
        ids = sorted(self.running_reward)
        return {
            "seen": self.seen.state_dict(),
            "groups": ids,
            "running_reward": [self.running_reward[g] for g in ids],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the questions seen and running rewards."""
        self.seen.load_state_dict(state["seen"])
        self.running_reward = {
            int(g): float(m) for g, m in zip(state["groups"], state["running_reward"], strict=True)
        }


# ---------------------------------------------------------------------------- dynamic sampling (DAPO)


def filter_zero_variance(rewards: Tensor, group_ids: Tensor, tol: float = 0.0) -> Tensor:
    """Which groups carry a learning signal (DAPO's dynamic-sampling filter; Yu et al. 2025, 2503.14476).

    A group whose rewards are all equal (max - min <= ``tol``; e.g. all correct or all wrong, or a single
    response) gets zero group-relative advantage and only dilutes the batch; DAPO drops such groups and
    samples more.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        tol: largest reward spread still counted as "all equal".

    Returns:
        ``keep [G]`` bool, one per distinct group id in ascending order (``torch.unique(group_ids)``);
        ``keep[torch.unique(group_ids, return_inverse=True)[1]]`` is the per-response mask.
    """
    _check_inputs(rewards, group_ids)
    index, counts, _, _ = _group_stats(rewards, group_ids)
    return _group_spread(rewards, index, len(counts)) > tol


def domain_batch_stats(
    rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, tol: float = 0.0
) -> dict[int, dict[str, float]]:
    """Per-domain statistics of one step, the input of :meth:`AdaptiveDomainSampler.update`.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        domain_ids: ``[N]`` domain id of each response (constant within a group).
        tol: reward spread counted as zero variance (see :func:`filter_zero_variance`).

    Returns:
        domain id -> ``{"zero_var_frac": share of the domain's groups with no reward spread,
        "mean_reward": mean reward of its responses, "groups": number of its groups}``.
    """
    _check_inputs(rewards, group_ids, domain_ids)
    index, counts, _, _ = _group_stats(rewards, group_ids)
    group_domain = _group_domains(index, len(counts), domain_ids)  # [G]
    flat = (_group_spread(rewards, index, len(counts)) <= tol).double()  # [G]
    zero_frac = _per_domain_mean(flat, group_domain)
    mean_reward = _per_domain_mean(rewards, domain_ids)
    uniq, n = torch.unique(group_domain, return_counts=True)
    groups = dict(zip(uniq.tolist(), n.tolist()))
    return {
        d: {
            "zero_var_frac": float(zero_frac[d]),
            "mean_reward": float(mean_reward[d]),
            "groups": int(groups[d]),
        }
        for d in sorted(groups)
    }


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
