"""Advantage estimators: one scalar per response (ALGORITHMS.md sections 1-2).

Pure functions on ``rewards [N]`` and ``group_ids [N]`` (responses of the same prompt share a group id;
any integers, not necessarily contiguous), vectorised with scatter ops. The callable classes at the end
are what configs select by ``class_path``; they share the :class:`AdvantageEstimator` protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from qoq.rl.domain_stats import DomainStats, Window, single_threaded
from qoq.rl.groups import (
    batch_std,
    check_inputs,
    group_domains,
    group_stats,
    group_std,
    lookup,
    per_domain_mean,
    standardize,
    zero_adv_frac,
)


@dataclass
class AdvantageOutput:
    """What an estimator returns.

    Attributes:
        advantages: ``[N]`` one advantage per response.
        metrics: diagnostics (tensors, or per-domain dicts of tensors); see each estimator.
    """

    advantages: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdvantageInputs:
    """Everything an estimator may use; the system fills every field it has (no estimator is probed).

    Attributes:
        rewards: ``[N]`` total reward of each response.
        group_ids: ``[N]`` group (prompt) of each response: any integers.
        domain_ids: ``[N]`` domain id of each response (constant within a group).
        kl: ``[N]`` per-response KL(sampling policy || reference), when the estimator ``needs_kl``.
        components: reward component name -> ``[N]`` values (NaN where a term does not apply).
        weights: reward component name -> its weight in the total.
    """

    rewards: Tensor
    group_ids: Tensor
    domain_ids: Tensor
    kl: Tensor | None = None
    components: dict[str, Tensor] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)


class AdvantageEstimator(Protocol):
    """The interface every estimator implements."""

    #: True when the estimator uses ``AdvantageInputs.kl`` (the system then computes reference log-probs).
    needs_kl: bool

    def __call__(self, inputs: AdvantageInputs) -> AdvantageOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------- pure estimators
def grpo(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO score: s_i = (r_i - mean_q) / (std_q + eps), std unbiased (n - 1).

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        eps: added to the group std.

    Returns:
        ``[N]`` advantages (0 for groups whose rewards are all equal, or of size one).
    """
    index, counts, means, _ = group_stats(rewards, group_ids)
    std = group_std(rewards, index, counts, means)
    return ((rewards.double() - means[index]) / (std[index] + eps)).to(rewards.dtype)


def dr_grpo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO score: s_i = r_i - mean_q (no std division).

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.

    Returns:
        ``[N]`` advantages.
    """
    index, _, means, _ = group_stats(rewards, group_ids)
    return (rewards.double() - means[index]).to(rewards.dtype)


def rloo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out: s_i = r_i - mean of the other n - 1 rewards of the group.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.

    Returns:
        ``[N]`` advantages (0 for groups of size one).
    """
    index, counts, _, sums = group_stats(rewards, group_ids)
    r = rewards.double()
    others = (sums[index] - r) / (counts[index] - 1).clamp(min=1)  # [N]
    return torch.where(counts[index] > 1, r - others, torch.zeros_like(r)).to(rewards.dtype)


def reinforce_pp_baseline(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ with baseline: x_i = r_i - mean_q, then whitened over the whole batch.

    Returns ``[N]`` advantages (x - mean(x)) / (std(x) + eps), std unbiased; arguments as :func:`grpo`
    (``eps`` here is added to the batch std).
    """
    x = dr_grpo(rewards, group_ids).double()
    return ((x - x.mean()) / (batch_std(x) + eps)).to(rewards.dtype)


def question_vectors(rewards: Tensor, group_ids: Tensor, domain_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Group rewards into one sorted vector per question.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        domain_ids: ``[N]`` domain of each response (constant within a group).

    Returns:
        ``vectors [Q, n]`` sorted ascending, ``question_domain [Q]`` and ``question_of [N]`` (row of each
        response in ``vectors``).
    """
    uniq, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = int(counts[0])
    if not bool((counts == n).all()):
        raise ValueError(
            f"DRPO needs the same number of rollouts per prompt; group sizes are {counts.tolist()}"
        )
    order = torch.argsort(index, stable=True)  # [N] responses grouped by question
    vectors = rewards[order].view(len(uniq), n)  # [Q, n]
    domains = domain_ids[order].view(len(uniq), n)  # [Q, n]
    if not bool((domains == domains[:, :1]).all()):
        raise ValueError("DRPO: responses of the same prompt (group id) carry different domain ids")
    return vectors.sort(dim=1).values, domains[:, 0], index


def drpo(
    rewards: Tensor,
    group_ids: Tensor,
    domain_ids: Tensor,
    stats: DomainStats,
    kl: Tensor | None = None,
    *,
    domain_only: bool = False,
    damping_quantile: float = 0.75,
    damping_over: Literal["all", "positive"] = "all",
    cap: float | None = None,
    eps: float = 1e-6,
    push: bool = True,
    step: int | None = None,
) -> tuple[Tensor, dict[str, Any]]:
    """Domain-aware Relative Policy Optimization advantages (ALGORITHMS.md section 2).

    1. s_i = GRPO score; each question's sorted reward vector is pushed into ``stats`` (if ``push``).
    2. Per domain d in the batch, the elbow-chosen K-means of its history gives cluster difficulty m_c
       (centroid mean) and size N_c; mu_d = sum_c(m_c / N_c) / sum_c(1 / N_c); N_d = history size.
    3. T_d = max(sqrt(N_d) mu_d, eps); T_c = max(sqrt(N_c) m_c, eps) for the cluster nearest to the
       question's vector (T_c = 1 when ``domain_only``); s~_i = s_i / (T_d T_c).
    4. With ``kl`` (per-response KL to the reference, e.g. k3 token mean): z_i = max(s~_i kl_i, 0),
       t = quantile(z, damping_quantile), s~_i *= t / (t + z_i) (responses with z_i = 0 are left as they
       are, which also covers t = z_i = 0).
    5. A_i = s~_i / (std(s~) + eps) over the whole batch (unbiased std); every A_i must be finite.

    Without damping each group keeps mean zero; the batch has unit std (up to eps). Questions whose
    rewards are all equal still enter the history (they shape the clusters) but get zero advantage.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response; every group must have the same size n.
        domain_ids: ``[N]`` domain index of each response.
        stats: the domain history (updated in place when ``push``).
        kl: ``[N]`` per-response KL(pi || pi_ref) for damping, or None for no damping.
        domain_only: drop the cluster factor (the DomainOnly ablation).
        damping_quantile: the quantile t of the damping rule.
        damping_over: the responses t is taken over: ``"all"`` (the paper; t = 0 whenever 25 % or fewer
            have z_i > 0, which zeroes every positive advantage) or ``"positive"`` (z_i > 0 only).
        cap: clip the final advantages to [-cap, cap] after step 5; None (the paper): no clipping.
        eps: floor of the temperatures and the batch std's epsilon; also GRPO's epsilon.
        push: push this batch into ``stats`` first (False: use the history as it is; every domain of the
            batch must then already have one).
        step: the step passed to :meth:`DomainStats.push` (default: the next one).

    Returns:
        ``advantages [N]`` (dtype of ``rewards``) and metrics: per-domain dicts keyed by domain id
        ``T_d``, ``T_c_mean`` (mean over the batch's questions), ``k``, ``history`` (N_d), ``abs_adv``
        (mean |A| of the domain's responses), plus ``zero_adv_frac`` and, with damping, ``damping_t``.

    Raises:
        ValueError: on non-finite rewards, unequal group sizes or a group spanning two domains.
        FloatingPointError: if any advantage is not finite.
    """
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("DRPO: rewards contain NaN or inf (nothing was pushed into the history)")
    with single_threaded():  # small tensors: intra-op threads only add hand-off cost
        damping = (damping_quantile, damping_over)
        return _drpo(rewards, group_ids, domain_ids, stats, kl, domain_only, damping, cap, eps, push, step)


def _drpo(
    rewards: Tensor,
    group_ids: Tensor,
    domain_ids: Tensor,
    stats: DomainStats,
    kl: Tensor | None,
    domain_only: bool,
    damping: tuple[float, str],
    cap: float | None,
    eps: float,
    push: bool,
    step: int | None,
) -> tuple[Tensor, dict[str, Any]]:
    vectors, q_domain, q_of = question_vectors(rewards, group_ids, domain_ids)  # [Q, n], [Q], [N]
    if push:
        stats.push(vectors, q_domain, step)
    s = grpo(rewards, group_ids, eps).double()  # [N]
    q_domain_cpu, vectors_cpu = q_domain.cpu(), vectors.detach().cpu().double()
    t_d_q = torch.ones(len(q_domain_cpu), dtype=torch.float64)  # [Q]
    t_c_q = torch.ones(len(q_domain_cpu), dtype=torch.float64)  # [Q]
    metrics: dict[str, Any] = {"T_d": {}, "T_c_mean": {}, "k": {}, "history": {}, "abs_adv": {}}
    for d, fit in stats.clusters_many(q_domain_cpu.unique().tolist()).items():
        m_c, n_c = fit.difficulty, fit.sizes  # [k], [k]
        mu_d = (m_c / n_c).sum() / (1.0 / n_c).sum()
        t_d = (fit.num_questions**0.5 * mu_d).clamp(min=eps)
        in_d = q_domain_cpu == d  # [Q]
        t_d_q[in_d] = t_d
        if not domain_only:
            t_c = (n_c.sqrt() * m_c).clamp(min=eps)  # [k]
            t_c_q[in_d] = t_c[fit.assign(vectors_cpu[in_d])]
        metrics["T_d"][d] = t_d.float()
        metrics["T_c_mean"][d] = t_c_q[in_d].mean().float()
        metrics["k"][d] = torch.tensor(fit.k)
        metrics["history"][d] = torch.tensor(fit.num_questions)
    scale = (t_d_q * t_c_q).to(s.device)[q_of]  # [N]
    s_tilde = s / scale
    if kl is not None:
        z = (s_tilde * kl.detach().double()).clamp(min=0)  # [N]
        quantile, over = damping  # over "all" responses (the paper) or the "positive" z only
        positive = z[z > 0]
        t = torch.quantile(positive if over == "positive" and len(positive) else z, quantile)
        s_tilde = s_tilde * torch.where(z > 0, t / (t + z), torch.ones_like(z))
        metrics["damping_t"] = t.float()
    adv = s_tilde / (batch_std(s_tilde) + eps)  # [N]
    if cap is not None:
        metrics["capped_frac"] = (adv.abs() > cap).float().mean().float()
        adv = adv.clamp(-cap, cap)
    if not bool(torch.isfinite(adv).all()):
        raise FloatingPointError(
            "DRPO produced non-finite advantages from finite rewards "
            f"(T_d * T_c in [{float(scale.min())}, {float(scale.max())}], eps={eps})"
        )
    abs_adv = adv.abs().cpu()
    for d in metrics["T_d"]:
        metrics["abs_adv"][d] = abs_adv[(domain_ids.cpu() == d)].mean().float()
    metrics.update(zero_adv_frac(adv))
    return adv.to(rewards.dtype), metrics


# ------------------------------------------------------------------------------- estimator classes
class Stateless:
    """Base of estimators without state: ``needs_kl = False``, an empty ``state_dict``; subclasses define
    :meth:`score` and report ``zero_adv_frac``."""

    needs_kl = False

    def score(self, inputs: AdvantageInputs) -> Tensor:
        """``[N]`` advantages."""
        raise NotImplementedError

    def __call__(self, inputs: AdvantageInputs) -> AdvantageOutput:
        adv = self.score(inputs)
        return AdvantageOutput(adv, zero_adv_frac(adv))

    def state_dict(self) -> dict[str, Any]:
        """Stateless: an empty dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless: nothing to restore."""


class GRPO(Stateless):
    """Group-relative advantage: the group z-score of each reward.

    Args:
        eps: added to the group std.
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def score(self, inputs: AdvantageInputs) -> Tensor:
        return grpo(inputs.rewards, inputs.group_ids, self.eps)


class DrGRPO(Stateless):
    """Dr. GRPO: reward minus the group mean, no std division."""

    def score(self, inputs: AdvantageInputs) -> Tensor:
        return dr_grpo(inputs.rewards, inputs.group_ids)


class RLOO(Stateless):
    """REINFORCE leave-one-out: reward minus the mean of the group's other rewards."""

    def score(self, inputs: AdvantageInputs) -> Tensor:
        return rloo(inputs.rewards, inputs.group_ids)


class ReinforcePPBaseline(GRPO):
    """REINFORCE++ with a group-mean baseline, whitened over the batch.

    Args:
        eps: added to the batch std.
    """

    def score(self, inputs: AdvantageInputs) -> Tensor:
        return reinforce_pp_baseline(inputs.rewards, inputs.group_ids, self.eps)


class DRPO:
    """Domain-aware Relative Policy Optimization (the paper's method; see :func:`drpo`).

    Ablations are single switches: ``domain_only=True`` (DomainOnly), ``kl_damping=False`` (NoKL, which is
    also what the released code runs), ``k_max`` in {1, 3, 10, 20}; ``window="cumulative"`` reproduces the
    released code's ever-growing history.

    Args:
        window: history kept per domain: a number of steps, ``"cumulative"`` or ``"batch"``.
        k_max: largest number of K-means clusters per domain.
        tau: elbow threshold on the ratio of successive inertia drops.
        domain_only: drop the cluster factor (T_c = 1).
        kl_damping: damp advantages by the per-response KL to the reference (then ``kl`` is required).
        damping_quantile: quantile of the damping rule.
        damping_over: ``"all"`` (the paper) or ``"positive"``: the responses the damping quantile is taken
            over (the ``drpo_damp_positive`` variant).
        cap: clip advantages to [-cap, cap] (the ``drpo_cap2`` variant); None (the paper) does not.
        eps: temperature floor and epsilon of the standardisations.
        seed: K-means random state.
        kmeans_backend: ``"torch"`` (default) or ``"sklearn"`` K-means (see
            :func:`qoq.rl.domain_stats.cluster_history`).
    """

    def __init__(
        self,
        window: Window = 50,
        k_max: int = 10,
        tau: float = 0.1,
        domain_only: bool = False,
        kl_damping: bool = True,
        damping_quantile: float = 0.75,
        damping_over: Literal["all", "positive"] = "all",
        cap: float | None = None,
        eps: float = 1e-6,
        seed: int = 0,
        kmeans_backend: Literal["torch", "sklearn"] = "torch",
    ):
        self.stats = DomainStats(window=window, k_max=k_max, tau=tau, seed=seed, backend=kmeans_backend)
        self.domain_only, self.kl_damping = domain_only, kl_damping
        self.damping_quantile, self.eps = damping_quantile, eps
        if damping_over not in ("all", "positive"):
            raise ValueError(f"DRPO: damping_over must be 'all' or 'positive', got {damping_over!r}")
        if cap is not None and not cap > 0:
            raise ValueError(f"DRPO: cap must be positive or null, got {cap}")
        self.damping_over, self.cap = damping_over, cap

    @property
    def needs_kl(self) -> bool:
        """True when KL damping is on: the caller must pass per-response KL to the reference."""
        return self.kl_damping

    def __call__(self, inputs: AdvantageInputs) -> AdvantageOutput:
        if self.kl_damping and inputs.kl is None:
            raise ValueError("DRPO(kl_damping=True) needs kl: per-response KL(pi || ref) [N]")
        adv, metrics = drpo(
            inputs.rewards,
            inputs.group_ids,
            inputs.domain_ids,
            self.stats,
            inputs.kl if self.kl_damping else None,
            domain_only=self.domain_only,
            damping_quantile=self.damping_quantile,
            damping_over=self.damping_over,
            cap=self.cap,
            eps=self.eps,
        )
        return AdvantageOutput(adv, metrics)

    def state_dict(self) -> dict[str, Any]:
        """The domain history (see :meth:`DomainStats.state_dict`)."""
        return {"stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the domain history."""
        self.stats.load_state_dict(state["stats"])


def _finite_or_raise(adv: Tensor, name: str) -> Tensor:
    if not bool(torch.isfinite(adv).all()):
        raise FloatingPointError(f"{name} produced non-finite advantages from finite rewards")
    return adv


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
    index, counts, _, _ = group_stats(torch.zeros_like(values), group_ids)  # validates shapes
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
    return standardize(total, eps, center=True).to(dtype)


class ComponentNormalized(Stateless):
    """GDPO-style advantages: each reward component group-normalised on its own (see
    :func:`component_normalized`).

    Uses ``AdvantageInputs.components`` and ``.weights`` (the reward function's own, unless set here).

    Args:
        eps: added to the group stds and to the batch std.
        weights: component -> weight for the combination; None uses the weights the caller passes (the
            reward function's own).
        renormalize: rescale each response's combination to the full weight total over the components
            that apply to it (as the total reward does for a target without a region).
    """

    def __init__(self, eps: float = 1e-6, weights: dict[str, float] | None = None, renormalize: bool = False):
        self.eps, self.weights, self.renormalize = eps, weights, renormalize

    def __call__(self, inputs: AdvantageInputs) -> AdvantageOutput:
        rewards, group_ids, components = inputs.rewards, inputs.group_ids, inputs.components
        check_inputs(rewards, group_ids, inputs.domain_ids)
        if not components:
            raise ValueError("ComponentNormalized needs the reward components (AdvantageInputs.components)")
        use = self.weights if self.weights is not None else inputs.weights
        if not use:
            raise ValueError("ComponentNormalized needs weights: set them in the config or in AdvantageInputs")
        adv = component_normalized(components, group_ids, use, self.eps, self.renormalize)
        adv = _finite_or_raise(adv.to(rewards.dtype), "ComponentNormalized")
        metrics: dict[str, Any] = {**zero_adv_frac(adv)}
        for name, w in use.items():
            if float(w) != 0.0:
                z = masked_group_zscore(components[name].to(group_ids.device), group_ids, self.eps)
                metrics[f"{name}_signal_frac"] = (z != 0).float().mean().detach()
        return AdvantageOutput(adv, metrics)


# ---------------------------------------------------------------------------------------------- DISCO


def disco(
    rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, domain_frequency: Mapping[int, float], *,
    difficulty_scale: float = 1.0,
    reward_range: tuple[float, float] = (0.0, 1.0),
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, Any]]:
    """Domain- and uncertainty-weighted GRPO, in the spirit of DISCO (Zhou et al. 2025, arXiv 2505.15074).

    DISCO scales GRPO by a domain weight (rarer domains up) and a difficulty weight from prompt-level
    self-consistency (uncertain prompts up). qoq's rewards are continuous (IoU), so it measures a group's
    uncertainty by its reward spread instead of answer agreement. What qoq computes:

    1. s_i = GRPO z-score of r_i in its group (:func:`grpo`);
    2. w_dom(d) = log(1 + 1 / p_d), p_d = ``domain_frequency[d]`` (a single domain keeps a positive weight);
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
    check_inputs(rewards, group_ids, domain_ids)
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"DISCO: reward_range must be (lo, hi) with hi > lo, got {reward_range}")
    index, counts, means, _ = group_stats(rewards, group_ids)
    group_domains(index, len(counts), domain_ids)
    missing = sorted(set(domain_ids.unique().tolist()) - set(domain_frequency))
    if missing:
        raise ValueError(f"DISCO: no frequency for domain ids {missing}")
    dev = rewards.double() - means[index]  # [N]
    sigma = (torch.zeros_like(means).index_add_(0, index, dev * dev) / counts).sqrt()  # [G] population std
    w_diff = 1.0 + difficulty_scale * (sigma / ((hi - lo) / 2)).clamp(max=1.0)  # [G]
    p = lookup(domain_ids, domain_frequency)  # [N]
    if not bool((p > 0).all()):
        raise ValueError(f"DISCO: domain frequencies must be > 0, got {dict(domain_frequency)}")
    w_dom = torch.log1p(1.0 / p)  # [N]
    s_tilde = grpo(rewards, group_ids, eps).double() * w_dom * w_diff[index]
    adv = _finite_or_raise(standardize(s_tilde, eps), "DISCO")
    metrics: dict[str, Any] = {
        "w_dom": {d: v.float() for d, v in per_domain_mean(w_dom, domain_ids).items()},
        "w_diff_mean": {d: v.float() for d, v in per_domain_mean(w_diff[index], domain_ids).items()},
        **zero_adv_frac(adv),
    }
    return adv.to(rewards.dtype), metrics


class _DomainCounts:
    """Questions seen per domain id since the start (a checkpointed running count)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def observe(self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor) -> None:
        """Check one batch's inputs and count its questions (groups) per domain."""
        check_inputs(rewards, group_ids, domain_ids)
        index, counts, _, _ = group_stats(rewards, group_ids)
        domain_of = group_domains(index, len(counts), domain_ids).cpu()
        uniq, n = torch.unique(domain_of, return_counts=True)
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

    def __init__(
        self, difficulty_scale: float = 1.0, reward_range: tuple[float, float] = (0.0, 1.0), eps: float = 1e-6
    ):
        if difficulty_scale < 0:
            raise ValueError(f"DISCO: difficulty_scale must be >= 0, got {difficulty_scale}")
        self.difficulty_scale, self.reward_range, self.eps = difficulty_scale, tuple(reward_range), eps
        self.seen = _DomainCounts()

    def __call__(self, inputs: AdvantageInputs) -> AdvantageOutput:
        rewards, group_ids, domain_ids = inputs.rewards, inputs.group_ids, inputs.domain_ids
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

    def __init__(
        self, momentum: float = 0.9, alpha: float = 0.5, beta: float = 1.0, floor: float = 0.05, eps: float = 1e-6
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"FairGRPO: momentum must be in [0, 1), got {momentum}")
        if floor <= 0:
            raise ValueError(f"FairGRPO: floor must be > 0, got {floor}")
        self.momentum, self.alpha, self.beta, self.floor, self.eps = momentum, alpha, beta, floor, eps
        self.seen = _DomainCounts()
        self.running_reward: dict[int, float] = {}

    def __call__(self, inputs: AdvantageInputs) -> AdvantageOutput:
        rewards, group_ids, domain_ids = inputs.rewards, inputs.group_ids, inputs.domain_ids
        self.seen.observe(rewards, group_ids, domain_ids)
        batch_mean = per_domain_mean(rewards, domain_ids)
        for g, m in batch_mean.items():
            m = float(m)
            old = self.running_reward.get(g)
            self.running_reward[g] = m if old is None else self.momentum * old + (1.0 - self.momentum) * m
        w = fairness_weights(
            self.running_reward, self.seen.counts, alpha=self.alpha, beta=self.beta, floor=self.floor
        )
        s_tilde = grpo(rewards, group_ids, self.eps).double() * lookup(domain_ids, w)
        adv = _finite_or_raise(standardize(s_tilde, self.eps), "FairGRPO")
        present = sorted(batch_mean)
        mean_w = sum(w[g] for g in present) / len(present)
        metrics: dict[str, Any] = {
            "weight": {g: torch.tensor(w[g] / mean_w, dtype=torch.float32) for g in present},
            "running_reward": {g: torch.tensor(self.running_reward[g], dtype=torch.float32) for g in present},
            **zero_adv_frac(adv),
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
