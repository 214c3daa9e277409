"""The policy update of one RL step: batch planning, old log-probs, and the PPO loop, as plain functions.

Nothing here needs a Trainer: the loop gets the optimizer, the gradient forward and the backward as
arguments (:class:`UpdateHooks`), so tests drive it with a bare ``torch.optim`` optimizer.

Old log-probs (the PPO ratio's denominator), ``old_logprobs="reuse"`` (default): the responses of the
first mini-batch of the first epoch (every response when ``mini_batches=1``) take the detached log-probs
of their own gradient pass (the weights have not moved yet, so they are exactly the old log-probs), and
only the other responses get a no-grad forward before the update. DRPO's KL damping needs
KL(sampling policy || reference) before the update: it uses the engine's own log-probs when sampling has
no top-k / top-p cut (:func:`engine_logprobs_are_exact`), and otherwise the forward over every response.
``old_logprobs="forward"``: that forward over every response, always (the behaviour of earlier versions).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qoq.rl import losses
from qoq.types import PromptBatch, RolloutBatch, SamplingParams


@dataclass
class LossConfig:
    """Policy-loss settings (ALGORITHMS.md sections 3 and 7; docs/OBJECTIVES.md).

    Args:
        eps_low: lower PPO clip range (ratio >= 1 - eps_low).
        eps_high: upper PPO clip range (ratio <= 1 + eps_high); the released code used 0.3 ("clip-higher").
        dual_clip: dual-clip constant c for negative advantages (released: 3.0); None disables it.
        kl_coef: coefficient beta of the KL-to-reference loss term (released: 1e-4 for 7B); 0 disables it.
        kl_kind: KL estimator: "k1", "k2" or "k3" (low-variance, clamped to [-10, 10]).
        entropy_coef: entropy bonus coefficient (off by default).
        agg: loss aggregation: "token_mean", "seq_mean_token_mean" (paper) or "seq_mean_token_sum".
        ratio_level: "token" (PPO / GRPO ratio per token) or "sequence" (GSPO: the length-normalised
            sequence ratio, clipped per response; use clip ranges near 3e-4 / 4e-4, configs/algorithm/gspo.yaml).
        mismatch: engine/trainer mismatch correction from the rollout engine's log-probs: "token_tis"
            (truncated IS, weights min(rho_t, mismatch_high)), "seq_mask" (drop responses whose sequence
            ratio leaves [mismatch_low, mismatch_high]), "icepop" (zero the loss of tokens whose ratio leaves
            the band, weight the others by it); None (default) only logs the mismatch.
        mismatch_low: lower bound of the band of the masking modes.
        mismatch_high: the cap of "token_tis", the upper bound of the band of the masking modes.
        mismatch_seq_agg: "seq_mask"'s sequence ratio: "mean" (geometric mean of the token ratios) or
            "sum" (their product).
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_kind: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    ratio_level: Literal["token", "sequence"] = "token"
    mismatch: Literal["token_tis", "seq_mask", "icepop"] | None = None
    mismatch_low: float = 0.5
    mismatch_high: float = 2.0
    mismatch_seq_agg: Literal["mean", "sum"] = "mean"


class NonFiniteError(FloatingPointError):
    """A NaN or infinite log-prob, ratio, loss or gradient in a training step (never given to the optimizer)."""


@dataclass
class UpdateSettings:
    """How the update splits one step's responses (the system's flat settings, gathered).

    Args:
        loss: policy-loss settings.
        ppo_epochs: passes over the rollout batch.
        mini_batches: optimizer steps per epoch (responses split by group).
        micro_batch_size: responses per forward/backward; None = the whole mini-batch.
        token_budget: most padded tokens per micro-batch (``rows x (longest prompt + R)``); None = no limit.
        grad_clip: max gradient norm; 0 disables clipping.
        temperature: sampling temperature the log-probs are taken at.
        old_logprobs: ``"reuse"`` or ``"forward"`` (the module docstring).
    """

    loss: LossConfig
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int | None = None
    token_budget: int | None = None
    grad_clip: float = 1.0
    temperature: float = 1.0
    old_logprobs: Literal["reuse", "forward"] = "reuse"


@dataclass
class OldLogprobs:
    """The old (sampling-policy) log-probs known before the update.

    Attributes:
        logp: ``[N, R]`` old log-probs; 0 on rows not yet known.
        known: ``[N]`` bool, rows whose ``logp`` is set; the others take their first gradient pass's.
        behaviour: ``[N, R]`` log-probs DRPO's KL damping compares with the reference, or None.
    """

    logp: Tensor
    known: Tensor
    behaviour: Tensor | None = None


@dataclass
class UpdateHooks:
    """What the loop needs from its trainer (plain callables; a test passes its own).

    Attributes:
        optimizer: the optimizer (``zero_grad``, ``step``).
        grad_logprobs: ``rows [n] -> (logp [n, R], entropy [n, R] | None)`` with gradients.
        backward: ``loss -> None``.
        clip_grad: ``max_norm -> total norm`` of the trainable parameters' gradients.
        step: the global step (for messages).
    """

    optimizer: Any
    grad_logprobs: Callable[[Tensor], tuple[Tensor, Tensor | None]]
    backward: Callable[[Tensor], None]
    clip_grad: Callable[[float], Tensor | float]
    step: int = 0


# ---------------------------------------------------------------------------------------- planning
def mini_batch_plan(
    prompt_index: Tensor, num_groups: int, ppo_epochs: int, mini_batches: int, step: int
) -> list[list[Tensor]]:
    """The update's response rows, per epoch and mini-batch (mini-batches split by group).

    The group order is shuffled per epoch when ``mini_batches > 1``, by a generator seeded with ``step``
    (reproducible and resumable).

    Args:
        prompt_index: ``[N]`` group (prompt) of each response.
        num_groups: P.
        ppo_epochs: epochs.
        mini_batches: mini-batches per epoch.
        step: the global step (the shuffle's seed).

    Returns:
        ``plan[epoch][mini_batch]`` = ``[n_mb]`` response rows, on ``prompt_index``'s device.
    """
    group_order = torch.arange(num_groups)
    gen = torch.Generator().manual_seed(int(step))
    index = prompt_index.cpu()
    plan = []
    for _ in range(ppo_epochs):
        if mini_batches > 1:
            group_order = torch.randperm(num_groups, generator=gen)
        plan.append(
            [
                torch.nonzero(torch.isin(index, groups)).flatten().to(prompt_index.device)  # [n_mb]
                for groups in group_order.chunk(mini_batches)
            ]
        )
    return plan


def micro_batches(
    rows: Tensor,
    prompt_index: Tensor,
    width: int,
    prompt_lengths: list[int] | None,
    size: int | None,
    token_budget: int | None,
) -> list[Tensor]:
    """Split a mini-batch's rows into micro-batches by ``size`` rows and ``token_budget`` padded tokens.

    Args:
        rows: ``[n]`` response rows of the mini-batch.
        prompt_index: ``[N]`` prompt of each response.
        width: R, the padded response width.
        prompt_lengths: P prompt lengths (needed by ``token_budget``).
        size: most rows per micro-batch; None = all.
        token_budget: most ``rows x (longest prompt + width)`` per micro-batch (at least one row); None = no limit.
    """
    size = size or len(rows)
    if token_budget is None or prompt_lengths is None:
        return list(rows.split(size))
    lengths = [prompt_lengths[i] for i in prompt_index[rows].tolist()]
    out, start, longest = [], 0, 0
    for k, length in enumerate(lengths):
        longest_k = max(longest, length)
        if k > start and ((k + 1 - start) * (longest_k + width) > token_budget or k - start >= size):
            out.append(rows[start:k])
            start, longest_k = k, length
        longest = longest_k
    out.append(rows[start:])
    return out


# ------------------------------------------------------------------------------------ old log-probs
def engine_logprobs_are_exact(rollout: RolloutBatch, sampling: SamplingParams) -> bool:
    """Whether the engine's log-probs are ``log_softmax(logits / T)`` up to suppressed tokens (no top-k/p cut)."""
    return rollout.engine_logprobs is not None and sampling.top_k <= 0 and sampling.top_p >= 1.0


def old_logprobs(
    policy: Any,
    embeds: list[Tensor],
    rollout: RolloutBatch,
    plan: list[list[Tensor]],
    settings: UpdateSettings,
    damping: bool,
    engine_exact: bool,
) -> OldLogprobs:
    """The old log-probs known before the update (see the module docstring for the rule).

    Args:
        policy: the current (= sampling) policy, for the no-grad forward.
        embeds: P prompt embeddings ``[L_i, H]`` (no grad).
        rollout: the N responses.
        plan: the update's rows per epoch and mini-batch (:func:`mini_batch_plan`).
        settings: ``old_logprobs`` (``"reuse"`` or ``"forward"``) and the temperature.
        damping: whether the estimator damps by KL (needs behaviour log-probs).
        engine_exact: whether the engine's log-probs can stand for the behaviour log-probs.
    """
    n = len(rollout.prompt_index)
    device = rollout.response_ids.device
    need = torch.ones(n, dtype=torch.bool, device=device)  # rows that get the no-grad forward now
    behaviour = None
    if settings.old_logprobs == "reuse":
        need[plan[0][0]] = False  # the first mini-batch's own gradient pass gives theirs
        if damping and engine_exact:
            behaviour = rollout.engine_logprobs.to(device, torch.float32)
        elif damping:
            need[:] = True
    logp = torch.zeros(rollout.response_ids.shape, dtype=torch.float32, device=device)  # [N, R]
    rows = torch.nonzero(need).flatten()
    if len(rows):
        logp[rows] = policy.response_logprobs(
            embeds, rollout.response_ids[rows], rollout.response_mask[rows], rollout.prompt_index[rows],
            temperature=settings.temperature,
        )[0]  # fmt: skip
    if damping and behaviour is None:
        behaviour = logp
    return OldLogprobs(logp, need, behaviour)


def reference_logprobs(policy: Any, reference: Any | None, batch: PromptBatch, rollout: RolloutBatch,
                       temperature: float) -> Tensor:  # fmt: skip
    """``[N, R]`` reference log-probs: of the frozen ``reference`` policy, or of ``policy`` in its
    ``reference_mode()`` (LoRA adapters off) when there is none. Call under ``torch.no_grad()``."""
    model = reference if reference is not None else policy
    with policy.reference_mode() if reference is None else contextlib.nullcontext():
        embeds = model.prompt_embeds(batch)
        args = (rollout.response_ids, rollout.response_mask, rollout.prompt_index)
        return model.response_logprobs(embeds, *args, temperature=temperature)[0]


def grad_logprobs(
    policy: Any, batch: PromptBatch, rollout: RolloutBatch, micro: Tensor, settings: UpdateSettings
) -> tuple[Tensor, Tensor | None]:
    """Current-policy log-probs ``[n, R]`` (and entropy, with an entropy bonus) of the ``micro`` rows, with
    gradients; only the prompts these rows answer are embedded, each once."""
    index = rollout.prompt_index[micro]  # [n_micro]
    used = torch.unique(index)  # [U] sorted
    if len(used) == len(batch):
        embeds = policy.prompt_embeds(batch)
    else:
        embeds = policy.prompt_embeds(batch.select(used.tolist()))
        index = torch.searchsorted(used, index)  # prompt positions in the sub-batch
    return policy.response_logprobs(
        embeds, rollout.response_ids[micro], rollout.response_mask[micro], index,
        temperature=settings.temperature, with_entropy=settings.loss.entropy_coef > 0,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- checks
def prompt_ids(batch: PromptBatch, rollout: RolloutBatch, rows: Tensor) -> list[str]:
    """The sorted prompt ids the response ``rows`` answer (for error messages)."""
    return sorted({str(batch.ids[i]) for i in rollout.prompt_index[rows].tolist()})


def check_finite(
    batch: PromptBatch, rollout: RolloutBatch, values: Tensor, rows: Tensor | None, phase: str, step: int
) -> None:
    """Raise :class:`NonFiniteError` naming the step, the phase and the prompt ids of non-finite rows.

    Args:
        batch: the step's prompts.
        rollout: the step's responses.
        values: ``[n]`` or ``[n, R]`` values of the responses ``rows`` (every response when None);
            ``[n, R]`` values count on response tokens only.
        rows: ``[n]`` response rows, or None.
        phase: where in the step the values come from (for the message).
        step: the global step.
    """
    rows = rows if rows is not None else torch.arange(len(rollout.prompt_index), device=values.device)
    mask = rollout.response_mask[rows].to(values.device) if values.ndim == 2 else None
    bad = losses.nonfinite_rows(values, mask)
    if bad:
        raise NonFiniteError(
            f"step {step}, phase '{phase}': non-finite values in {len(bad)} response(s), prompts "
            f"{prompt_ids(batch, rollout, rows[bad])}"
        )


# -------------------------------------------------------------------------------------- PPO loop
def ppo_update(
    batch: PromptBatch,
    rollout: RolloutBatch,
    old: OldLogprobs,
    ref_logp: Tensor | None,
    advantages: Tensor,
    plan: list[list[Tensor]],
    settings: UpdateSettings,
    hooks: UpdateHooks,
    prompt_lengths: list[int] | None = None,
) -> dict[str, Tensor]:
    """``ppo_epochs`` x ``mini_batches`` optimizer steps; returns the mean of the loss metrics.

    Args:
        batch: the P prompts.
        rollout: their N responses.
        old: old log-probs; rows not ``known`` are filled in place by the detached log-probs of their first
            gradient pass (which must come before any optimizer step: the first mini-batch of the first epoch).
        ref_logp: ``[N, R]`` reference log-probs, or None.
        advantages: ``[N]``.
        plan: rows per epoch and mini-batch (:func:`mini_batch_plan`).
        settings: loss, micro-batching and clipping.
        hooks: optimizer, gradient forward, backward, clipping.
        prompt_lengths: P prompt lengths (for ``token_budget``).
    """
    if settings.loss.mismatch is not None and rollout.engine_logprobs is None:
        raise ValueError(f"loss.mismatch={settings.loss.mismatch!r} needs the rollout engine's log-probs, "
                         "and the engine reported none")  # fmt: skip
    collected: dict[str, list[Tensor]] = defaultdict(list)
    known = old.known.clone()
    stepped = False
    for epoch in plan:
        for rows in epoch:
            normalizer = losses.loss_normalizer(rollout.response_mask[rows], settings.loss.agg)
            hooks.optimizer.zero_grad(set_to_none=True)
            step_metrics: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
            width = rollout.response_ids.shape[1]
            for micro in micro_batches(rows, rollout.prompt_index, width, prompt_lengths,
                                       settings.micro_batch_size, settings.token_budget):  # fmt: skip
                metrics = _micro_step(batch, rollout, old, known, stepped, ref_logp, advantages, micro,
                                      normalizer, settings.loss, hooks)  # fmt: skip
                for k, v in metrics.items():  # micro-batches share the step's normaliser: they sum
                    step_metrics[k] += v
            for k, v in step_metrics.items():
                collected[k].append(v)
            if settings.grad_clip > 0:
                norm = hooks.clip_grad(settings.grad_clip)
                collected["grad_norm"].append(torch.as_tensor(norm, dtype=torch.float32).detach().cpu())
                if not math.isfinite(float(norm)):
                    raise NonFiniteError(
                        f"step {hooks.step}, phase 'update (gradients)': non-finite gradient norm for prompts "
                        f"{prompt_ids(batch, rollout, rows)}"
                    )
            hooks.optimizer.step()
            stepped = True
    return {k: torch.stack(v).mean() for k, v in collected.items()}


def _micro_step(
    batch: PromptBatch,
    rollout: RolloutBatch,
    old: OldLogprobs,
    known: Tensor,
    stepped: bool,
    ref_logp: Tensor | None,
    advantages: Tensor,
    micro: Tensor,
    normalizer: float | Tensor,
    cfg: LossConfig,
    hooks: UpdateHooks,
) -> dict[str, Tensor]:
    """Forward, loss and backward of one micro-batch; returns its metrics (CPU float32, loss included)."""
    logp, entropy = hooks.grad_logprobs(micro)
    if not bool(known[micro].all()):
        if stepped:
            raise RuntimeError("ppo_update: old log-probs missing after an optimizer step")
        fill = micro[~known[micro]]
        old.logp[fill] = logp.detach()[~known[micro]]
        known[fill] = True
    check_finite(batch, rollout, logp, micro, "update (current log-probs)", hooks.step)
    is_weights = None
    if cfg.mismatch is not None:
        is_weights = losses.mismatch_weights(
            old.logp[micro], rollout.engine_logprobs[micro], rollout.response_mask[micro],
            cfg.mismatch, low=cfg.mismatch_low, high=cfg.mismatch_high, seq_agg=cfg.mismatch_seq_agg,
        )  # fmt: skip
    loss, metrics = losses.policy_loss(
        logp, old.logp[micro], advantages[micro], rollout.response_mask[micro],
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip, agg=cfg.agg, normalizer=normalizer,
        ref_logp=ref_logp[micro] if ref_logp is not None else None, kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind,
        entropy=entropy, entropy_coef=cfg.entropy_coef, is_weights=is_weights, ratio_level=cfg.ratio_level,
    )  # fmt: skip
    if not torch.isfinite(loss):
        raise NonFiniteError(
            f"step {hooks.step}, phase 'update (loss)': non-finite loss {float(loss)} for prompts "
            f"{prompt_ids(batch, rollout, micro)}"
        )
    hooks.backward(loss)
    out = {k: torch.as_tensor(v, dtype=torch.float32).detach().cpu() for k, v in metrics.items()}
    out["loss"] = loss.detach().float().cpu()
    return out


__all__ = [
    "LossConfig",
    "NonFiniteError",
    "OldLogprobs",
    "UpdateHooks",
    "UpdateSettings",
    "check_finite",
    "engine_logprobs_are_exact",
    "grad_logprobs",
    "micro_batches",
    "mini_batch_plan",
    "old_logprobs",
    "ppo_update",
    "reference_logprobs",
]
