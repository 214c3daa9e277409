"""Policy-gradient loss pieces (ALGORITHMS.md sections 3 and 7): KL estimators, aggregation, PPO-clip with
token- or sequence-level (GSPO) ratios, engine/trainer mismatch corrections, non-finite checks.

Micro-batching: :func:`loss_normalizer` counts the tokens or sequences of the *whole optimizer step*;
every micro-batch calls :func:`policy_loss` with that normaliser and the losses are summed (or their
gradients accumulated). The sum equals the loss of the step processed whole, for every aggregation mode.
The metrics :func:`policy_loss` returns are aggregated the same way, so they also add up over micro-batches.
Under DDP, which averages gradients over ranks, pass the global count divided by the world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

KLKind = Literal["k1", "k2", "k3"]
AggMode = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]
RatioLevel = Literal["token", "sequence"]
MismatchMode = Literal["token_tis", "seq_mask", "icepop"]
_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
_MISMATCH_MODES = ("token_tis", "seq_mask", "icepop")
_LOG_RATIO_CLAMP = 20.0  # keeps exp() finite (and gradients NaN-free) without changing clamped outputs


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of tokens sampled from pi.

    With x = ref_logp - logp: ``k1`` = -x, ``k2`` = x^2 / 2, ``k3`` = exp(x) - x - 1 clamped to [-10, 10]
    (the "low-variance KL"; x is clamped to [-20, 20] first, which leaves the clamped value unchanged and
    keeps gradients finite).

    Args:
        logp: ``[N, R]`` log-probs under the policy.
        ref_logp: ``[N, R]`` log-probs under the reference.
        kind: estimator.

    Returns:
        ``[N, R]`` per-token KL estimates.
    """
    x = ref_logp - logp
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x.square()
    if kind == "k3":
        x = x.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (x.exp() - x - 1).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; expected 'k1', 'k2' or 'k3'")


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution of each position.

    Args:
        logits: ``[..., V]`` unnormalised log-probs.

    Returns:
        ``[...]`` entropies (nats).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def loss_normalizer(mask: Tensor | Sequence[Tensor], mode: AggMode = "token_mean") -> float:
    """The normaliser of a whole optimizer step, independent of how it is split into micro-batches.

    Args:
        mask: ``[N, R]`` bool response mask of the step, or the list of its micro-batches' masks.
        mode: aggregation mode (see :func:`aggregate`).

    Returns:
        The number of response tokens (``token_mean``) or of non-empty responses (the ``seq_*`` modes),
        at least 1.
    """
    masks = [mask] if isinstance(mask, Tensor) else list(mask)
    if mode not in _AGG_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {_AGG_MODES}")
    if mode == "token_mean":
        count = sum(int(m.sum()) for m in masks)
    else:
        count = sum(int(m.any(dim=-1).sum()) for m in masks)
    return float(max(count, 1))


def aggregate(
    values: Tensor, mask: Tensor, mode: AggMode = "token_mean", normalizer: float | Tensor = 1.0
) -> Tensor:
    """Reduce per-token values to a scalar with an explicit, step-wide normaliser.

    - ``token_mean``: sum over all response tokens / normaliser (= tokens in the step);
    - ``seq_mean_token_mean``: sum over responses of (token mean of the response) / normaliser
      (= responses in the step); the paper's 1/|o| per-sequence mean;
    - ``seq_mean_token_sum``: sum over responses of (token sum of the response) / normaliser.

    Args:
        values: ``[N, R]`` per-token values.
        mask: ``[N, R]`` bool, True on response tokens.
        mode: aggregation mode.
        normalizer: from :func:`loss_normalizer` over the whole optimizer step.

    Returns:
        A scalar tensor.
    """
    m = mask.to(values.dtype)
    if mode == "token_mean":
        total = (values * m).sum()
    elif mode == "seq_mean_token_mean":
        total = ((values * m).sum(-1) / m.sum(-1).clamp(min=1)).sum()
    elif mode == "seq_mean_token_sum":
        total = (values * m).sum()
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {_AGG_MODES}")
    return total / normalizer


def truncated_is_weights(old_logp: Tensor, engine_logp: Tensor, cap: float = 2.0) -> Tensor:
    """Truncated importance weights correcting for the rollout engine's own sampling distribution.

    Args:
        old_logp: ``[N, R]`` log-probs recomputed by the trainer (the behaviour policy it believes in).
        engine_logp: ``[N, R]`` log-probs reported by the rollout engine for the same tokens.
        cap: upper bound of the weights.

    Returns:
        ``[N, R]`` detached weights min(exp(old_logp - engine_logp), cap).
    """
    log_w = (old_logp - engine_logp).detach().clamp(max=_LOG_RATIO_CLAMP)
    return log_w.exp().clamp(max=cap)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Per-row mean of ``values`` over ``mask``.

    Args:
        values: ``[N, R]``.
        mask: ``[N, R]`` bool.

    Returns:
        ``[N]`` means (0 for rows with no masked entry).
    """
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def sequence_log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's length-normalised sequence log-ratio: (1 / |y_i|) sum_t (logp - old_logp).

    Args:
        logp: ``[N, R]`` current log-probs (gradients flow through them).
        old_logp: ``[N, R]`` log-probs of the sampling policy.
        mask: ``[N, R]`` bool response mask.

    Returns:
        ``[N]`` log s_i (0 for empty responses).
    """
    return masked_mean(logp - old_logp, mask)


def mismatch_weights(
    old_logp: Tensor, engine_logp: Tensor, mask: Tensor, mode: MismatchMode, *,
    low: float = 0.5, high: float = 2.0, seq_agg: Literal["mean", "sum"] = "mean",
) -> Tensor:  # fmt: skip
    """Per-token weights correcting for the engine/trainer mismatch (ALGORITHMS.md section 7).

    With rho_t = exp(old_logp - engine_logp) (trainer vs rollout engine, same weights):

    - ``token_tis`` (truncated IS): w_t = min(rho_t, high); ``low`` is unused.
    - ``seq_mask`` (masked IS, a rejection): rho_i = exp(mean_t log rho_t) (``seq_agg="mean"``, the
      geometric mean) or exp(sum_t log rho_t) (``"sum"``, the product); w_t = 1 for every token of a
      response with low <= rho_i <= high, 0 for every token of the others.
    - ``icepop`` (IcePop token masking): w_t = rho_t where low <= rho_t <= high, else 0.

    Each weight is a function of its own row only, so micro-batching cannot change it. Masked tokens keep
    their place in the loss normaliser (their loss is zero, the step's token count is unchanged).

    Args:
        old_logp: ``[N, R]`` trainer log-probs of the sampling policy.
        engine_logp: ``[N, R]`` the rollout engine's log-probs of the same tokens.
        mask: ``[N, R]`` bool response mask.
        mode: ``"token_tis"``, ``"seq_mask"`` or ``"icepop"``.
        low: lower bound of the band (masking modes).
        high: cap (``token_tis``) or upper bound of the band (masking modes).
        seq_agg: how ``seq_mask`` reduces the token log-ratios of a response.

    Returns:
        ``[N, R]`` detached weights, 0 on padding; a masked response token is exactly 0.
    """
    if mode not in _MISMATCH_MODES:
        raise ValueError(f"unknown mismatch correction {mode!r}; expected one of {_MISMATCH_MODES}")
    if mode != "token_tis" and not 0 <= low <= high:
        raise ValueError(f"mismatch band must satisfy 0 <= low <= high, got [{low}, {high}]")
    log_rho = (old_logp - engine_logp).detach().float().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [N, R]
    m = mask.to(log_rho.dtype)
    if mode == "token_tis":
        weights = log_rho.exp().clamp(max=high)
    elif mode == "icepop":
        rho = log_rho.exp()
        weights = torch.where((rho >= low) & (rho <= high), rho, torch.zeros_like(rho))
    else:
        if seq_agg == "mean":
            log_seq = masked_mean(log_rho, mask)
        elif seq_agg == "sum":
            log_seq = (log_rho * m).sum(-1)
        else:
            raise ValueError(f"seq_agg must be 'mean' or 'sum', got {seq_agg!r}")
        rho_seq = log_seq.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP).exp()  # [N]
        keep = (rho_seq >= low) & (rho_seq <= high)
        weights = keep.to(log_rho.dtype)[:, None].expand_as(log_rho)
    return (weights * m).to(old_logp.dtype)


def nonfinite_rows(values: Tensor, mask: Tensor | None = None) -> list[int]:
    """Rows holding a NaN or infinite value (on ``mask`` only, when given).

    Args:
        values: ``[N, ...]``.
        mask: bool of the same shape, or None (every entry counts).

    Returns:
        The offending row indices, ascending.
    """
    bad = ~torch.isfinite(values.detach())
    if mask is not None:
        bad = bad & mask
    return torch.nonzero(bad.reshape(len(values), -1).any(-1)).flatten().tolist()


def _log_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, ratio_level: RatioLevel) -> Tensor:
    """``[N, R]`` log of the PPO ratio, clamped: per token, or GSPO's per sequence.

    ``ratio_level="sequence"`` is GSPO (Zheng et al. 2025): every token of response i carries the value of
    the sequence ratio s_i = exp(:func:`sequence_log_ratio`), with the gradient of its own log-prob
    (s_it = sg(s_i) * exp(logp_t - sg(logp_t)), the "GSPO-token" form), and clipping acts on s_i, so a
    response is clipped as a whole. With one advantage per response this has the value and the gradient of
    the sequence-level objective -min(s_i A, clip(s_i) A) under every aggregation mode (d s_i / d logp_t =
    s_i / |y_i|); the paper's average over responses is ``agg="seq_mean_token_mean"``. s_i depends on its
    own row only: micro-batching does not change it.
    """
    if ratio_level == "token":
        return (logp - old_logp.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if ratio_level == "sequence":
        log_seq = sequence_log_ratio(logp.detach(), old_logp.detach(), mask)
        log_seq = log_seq.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [N]
        return log_seq[:, None] + logp - logp.detach()  # value log s_i, gradient of logp_t
    raise ValueError(f"ratio_level must be 'token' or 'sequence', got {ratio_level!r}")


def _clipped_surrogate(
    ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """``[N, R]`` per-token PPO-clip loss (dual-clipped for A < 0), and where the clip and the dual clip act."""
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [N, R]
    clipped = pg_clipped > pg_unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual = (adv < 0) & (pg > bound)
        pg = torch.where(dual, bound.expand_as(pg), pg)
    return pg, clipped, dual


def _surrogate_metrics(
    agg_: Any, logp: Tensor, old_logp: Tensor, pg: Tensor, clipped: Tensor, dual: Tensor, is_weights: Tensor | None
) -> dict[str, Tensor]:
    """The surrogate's metrics, each reduced by ``agg_`` (call under ``torch.no_grad()``)."""
    metrics = {
        "pg_loss": agg_(pg.detach()),
        "clip_frac": agg_(clipped.to(logp.dtype)),
        "dual_clip_frac": agg_(dual.to(logp.dtype)),
        "approx_kl": agg_(kl_penalty(logp.detach(), old_logp.detach(), "k3")),
    }
    if is_weights is not None:
        metrics["is_weight"] = agg_(is_weights.detach().to(logp.dtype))
        metrics["is_masked_frac"] = agg_((is_weights.detach() == 0).to(logp.dtype))
    return metrics


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    dual_clip: float | None = None,
    agg: AggMode = "token_mean",
    normalizer: float | Tensor,
    ref_logp: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: KLKind = "k3",
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weights: Tensor | None = None,
    ratio_level: RatioLevel = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip surrogate with optional dual-clip, KL-to-reference term and entropy bonus.

    Per token, with ratio rho = exp(logp - old_logp) (GSPO's sequence ratio with ``ratio_level="sequence"``,
    see :func:`_log_ratio`) and A the response's advantage: pg = max(-A rho, -A clip(rho, 1 - eps_low,
    1 + eps_high)); with dual-clip c (> 1), for A < 0, pg = min(pg, -A c); with ``is_weights`` w (a mismatch
    correction, :func:`mismatch_weights`), pg *= w. The per-token loss pg + kl_coef * KL(logp, ref_logp) -
    entropy_coef * entropy is reduced by :func:`aggregate` with the step-wide ``normalizer``.

    Args: ``logp`` ``[N, R]`` current log-probs (with grad); ``old_logp`` ``[N, R]`` of the sampling policy;
    ``advantages`` ``[N]``; ``mask`` ``[N, R]`` bool; ``ref_logp``, ``entropy``, ``is_weights`` ``[N, R]`` or
    None; ``normalizer`` from :func:`loss_normalizer`; the rest are the settings of ``LossConfig``.

    Returns:
        ``loss`` (scalar) and detached metrics aggregated like it: ``pg_loss``, ``clip_frac`` (clipped term
        active), ``dual_clip_frac``, ``approx_kl`` (k3, old vs current), ``kl`` (vs reference), ``entropy``,
        with ``is_weights`` ``is_weight`` (mean) and ``is_masked_frac`` (weight exactly 0).
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = {tuple(logp.shape[:1])}, got {tuple(advantages.shape)}")
    adv = advantages.detach().to(logp.dtype)[:, None]  # [N, 1]
    ratio = _log_ratio(logp, old_logp, mask, ratio_level).exp()  # [N, R]
    pg, clipped, dual = _clipped_surrogate(ratio, adv, eps_low, eps_high, dual_clip)
    if is_weights is not None:
        pg = pg * is_weights.detach()

    def agg_(values: Tensor) -> Tensor:
        return aggregate(values, mask, agg, normalizer)

    per_token = pg
    with torch.no_grad():
        metrics = _surrogate_metrics(agg_, logp, old_logp, pg, clipped, dual, is_weights)
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp.detach(), kl_kind)
        per_token = per_token + kl_coef * kl if kl_coef else per_token
        metrics["kl"] = agg_(kl.detach())
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy if entropy_coef else per_token
        metrics["entropy"] = agg_(entropy.detach())
    return agg_(per_token), metrics


def response_kl(logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: KLKind = "k3") -> Tensor:
    """Per-response KL to the reference: the token mean of :func:`kl_penalty` (DRPO's damping input).

    Args:
        logp: ``[N, R]`` policy log-probs.
        ref_logp: ``[N, R]`` reference log-probs.
        mask: ``[N, R]`` bool response mask.
        kind: estimator.

    Returns:
        ``[N]`` detached per-response KL (0 for empty responses).
    """
    return masked_mean(kl_penalty(logp.detach(), ref_logp.detach(), kind), mask)
