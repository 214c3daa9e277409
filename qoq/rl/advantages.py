"""Advantage estimators: one scalar per response (ALGORITHMS.md sections 1-2).

Pure functions on ``rewards [N]`` and ``group_ids [N]`` (responses of the same prompt share a group id;
any integers, not necessarily contiguous), vectorised with scatter ops. The callable classes at the end
are what configs select by ``class_path``; they share the :class:`AdvantageEstimator` protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from qoq.rl.domain_stats import DomainStats, Window, single_threaded


@dataclass
class AdvantageOutput:
    """What an estimator returns.

    Attributes:
        advantages: ``[N]`` one advantage per response.
        metrics: diagnostics (tensors, or per-domain dicts of tensors); see each estimator.
    """

    advantages: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


class AdvantageEstimator(Protocol):
    """The interface every estimator implements."""

    needs_kl: bool

    def __call__(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None = None
    ) -> AdvantageOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------- helpers
def _group_stats(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-response group index, group sizes, group means and group sums (float64)."""
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    uniq, index = torch.unique(group_ids, return_inverse=True)  # [G], [N] in 0..G-1
    r = rewards.double()
    groups = uniq.numel()
    counts = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(
        0, index, torch.ones_like(r)
    )
    sums = torch.zeros(groups, dtype=torch.float64, device=r.device).index_add_(0, index, r)  # [G]
    return index, counts, sums / counts, sums


def _group_std(rewards: Tensor, index: Tensor, counts: Tensor, means: Tensor) -> Tensor:
    """``[G]`` unbiased per-group std (0 for groups of one response)."""
    dev = rewards.double() - means[index]  # [N]
    ss = torch.zeros_like(means).index_add_(0, index, dev * dev)  # [G]
    return (ss / (counts - 1).clamp(min=1)).sqrt()


def _batch_std(x: Tensor) -> Tensor:
    """Unbiased std of a vector; 0 for fewer than two entries."""
    return x.std() if x.numel() > 1 else x.new_zeros(())


def _zero_adv_frac(advantages: Tensor) -> dict[str, Tensor]:
    return {"zero_adv_frac": (advantages == 0).float().mean().detach()}


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
    index, counts, means, _ = _group_stats(rewards, group_ids)
    std = _group_std(rewards, index, counts, means)
    return ((rewards.double() - means[index]) / (std[index] + eps)).to(rewards.dtype)


def dr_grpo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Dr. GRPO score: s_i = r_i - mean_q (no std division).

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.

    Returns:
        ``[N]`` advantages.
    """
    index, _, means, _ = _group_stats(rewards, group_ids)
    return (rewards.double() - means[index]).to(rewards.dtype)


def rloo(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """REINFORCE leave-one-out: s_i = r_i - mean of the other n - 1 rewards of the group.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.

    Returns:
        ``[N]`` advantages (0 for groups of size one).
    """
    index, counts, _, sums = _group_stats(rewards, group_ids)
    r = rewards.double()
    others = (sums[index] - r) / (counts[index] - 1).clamp(min=1)  # [N]
    return torch.where(counts[index] > 1, r - others, torch.zeros_like(r)).to(rewards.dtype)


def reinforce_pp_baseline(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """REINFORCE++ with baseline: x_i = r_i - mean_q, then whitened over the whole batch.

    Args:
        rewards: ``[N]`` response rewards.
        group_ids: ``[N]`` prompt id of each response.
        eps: added to the batch std.

    Returns:
        ``[N]`` advantages: (x - mean(x)) / (std(x) + eps), std unbiased.
    """
    x = dr_grpo(rewards, group_ids).double()
    return ((x - x.mean()) / (_batch_std(x) + eps)).to(rewards.dtype)


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

    Two switches leave the paper's rule (their defaults) for named variants: ``damping_over="positive"``
    takes t over the responses with z_i > 0 only (the paper's t is 0 whenever 25 % or fewer responses have
    z_i > 0, which zeroes every positive advantage of the batch), and ``cap`` clips every A_i to
    [-cap, cap] after step 5.

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
        damping_over: the responses t is taken over: ``"all"`` (the paper) or ``"positive"`` (z_i > 0).
        cap: clip the final advantages to [-cap, cap]; None (the paper): no clipping.
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
        return _drpo(
            rewards, group_ids, domain_ids, stats, kl, domain_only, damping_quantile, damping_over, cap, eps,
            push, step,
        )  # fmt: skip


def _drpo(
    rewards: Tensor,
    group_ids: Tensor,
    domain_ids: Tensor,
    stats: DomainStats,
    kl: Tensor | None,
    domain_only: bool,
    damping_quantile: float,
    damping_over: str,
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
        positive = z[z > 0]
        over = positive if damping_over == "positive" and len(positive) else z
        t = torch.quantile(over, damping_quantile)
        s_tilde = s_tilde * torch.where(z > 0, t / (t + z), torch.ones_like(z))
        metrics["damping_t"] = t.float()
    adv = s_tilde / (_batch_std(s_tilde) + eps)  # [N]
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
    metrics.update(_zero_adv_frac(adv))
    return adv.to(rewards.dtype), metrics


# ------------------------------------------------------------------------------- estimator classes
class _Stateless:
    needs_kl = False

    def state_dict(self) -> dict[str, Any]:
        """Stateless: an empty dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Stateless: nothing to restore."""


class GRPO(_Stateless):
    """Group-relative advantage: the group z-score of each reward.

    Args:
        eps: added to the group std.
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None = None
    ) -> AdvantageOutput:
        adv = grpo(rewards, group_ids, self.eps)
        return AdvantageOutput(adv, _zero_adv_frac(adv))


class DrGRPO(_Stateless):
    """Dr. GRPO: reward minus the group mean, no std division."""

    def __call__(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None = None
    ) -> AdvantageOutput:
        adv = dr_grpo(rewards, group_ids)
        return AdvantageOutput(adv, _zero_adv_frac(adv))


class RLOO(_Stateless):
    """REINFORCE leave-one-out: reward minus the mean of the group's other rewards."""

    def __call__(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None = None
    ) -> AdvantageOutput:
        adv = rloo(rewards, group_ids)
        return AdvantageOutput(adv, _zero_adv_frac(adv))


class ReinforcePPBaseline(_Stateless):
    """REINFORCE++ with a group-mean baseline, whitened over the batch.

    Args:
        eps: added to the batch std.
    """

    def __init__(self, eps: float = 1e-6):
        self.eps = eps

    def __call__(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None = None
    ) -> AdvantageOutput:
        adv = reinforce_pp_baseline(rewards, group_ids, self.eps)
        return AdvantageOutput(adv, _zero_adv_frac(adv))


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
        cap: clip advantages to [-cap, cap] (the ``drpo_cap3`` variant); None (the paper) does not.
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

    def __call__(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None = None
    ) -> AdvantageOutput:
        if self.kl_damping and kl is None:
            raise ValueError("DRPO(kl_damping=True) needs kl: per-response KL(pi || ref) [N]")
        adv, metrics = drpo(
            rewards,
            group_ids,
            domain_ids,
            self.stats,
            kl if self.kl_damping else None,
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
