"""PolicyOptimization: the GRPO-family RL LightningModule (DRPO by default, any estimator by config).

The module owns the RL loop of one training step and nothing else: the math lives in :mod:`qoq.rl`
(advantages, losses, rewards), the model in :class:`qoq.models.Policy`, generation in a
:class:`qoq.rl.rollout.RolloutEngine`, metrics and reports in :mod:`qoq.callbacks`.
"""

from __future__ import annotations

import contextlib
import math
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor

from qoq import strategies
from qoq.models.optim import decay_groups
from qoq.models.policy import Policy
from qoq.rl import losses
from qoq.rl.advantages import DRPO, AdvantageEstimator
from qoq.rl.balancing import domain_batch_stats
from qoq.rl.rewards import RewardFn, RewardOutput, extract_answer, parse_boxes
from qoq.rl.rollout.base import RolloutEngine
from qoq.rl.rollout.hf import HFEngine
from qoq.systems.dynamic_sampling import Collected, DynamicSampling, collect_dynamic, collect_plain
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


class PolicyOptimization(L.LightningModule):
    """GRPO-family reinforcement learning of a multimodal policy; DRPO with the default estimator.

    One training step: embed the prompts (encoders -> projector -> spliced LM embeddings), sample ``n``
    responses per prompt with the rollout engine, score them, compute advantages with the injected
    estimator (DRPO rescales them by domain rarity and difficulty), recompute old and reference
    log-probs, then ``ppo_epochs`` x ``mini_batches`` optimizer steps of the clipped surrogate (+ KL),
    and push the new weights into the engine (verified). Swapping ``advantage`` swaps the algorithm.

    Args:
        policy: the multimodal policy (LM + encoders + projector).
        init_policy_from: a checkpoint whose policy weights start the run (e.g. the SFT warm start written
            by ``qoq fit --model qoq.models.Policy``, or an earlier RL run); None keeps the built weights.
        advantage: advantage estimator, e.g. ``qoq.rl.advantages.DRPO`` or ``qoq.rl.advantages.GRPO``.
        reward: reward function (accuracy / IoU / format, weighted); default: the paper's weights.
        rollout: rollout engine: ``qoq.rl.rollout.VLLMEngine`` or ``qoq.rl.rollout.HFEngine`` (default).
        sampling: training rollout settings (``n`` is the group size).
        eval_sampling: evaluation generation settings (temperature 0 = greedy).
        loss: policy-loss settings.
        ppo_epochs: passes over each rollout batch.
        mini_batches: optimizer steps per rollout batch and epoch (responses split by group).
        micro_batch_size: responses per forward/backward (gradient accumulation); None = whole mini-batch.
        token_budget: split micro-batches by padded tokens instead: each holds as many responses as fit
            ``rows x (longest prompt + response width) <= token_budget`` (at least one); bounds activation
            memory when lengths vary. Combined with ``micro_batch_size``, both limits hold.
        old_logprobs: where the old (sampling-policy) log-probs of the PPO ratio come from.
            ``"reuse"`` (default): responses in the first mini-batch of the first epoch (every response
            when ``mini_batches=1``) take the detached log-probs of their own gradient pass: the weights
            have not moved yet, so these are exactly the old log-probs (ratio 1; with dropout, the same
            mask) and the separate no-grad forward is skipped; only the other mini-batches' responses get
            that forward before the update. DRPO's KL damping (an estimator with ``needs_kl``) needs
            KL(sampling policy || reference) before the update: it then uses the engine's own log-probs
            (``RolloutBatch.engine_logprobs``, reported by both engines) when sampling has no top-k / top-p
            cut, and otherwise falls back to the forward over every response. The engine's log-probs are
            renormalised over the non-suppressed tokens and come from the engine's kernels, so they differ
            from the trainer's by ``train/logp_mismatch_*`` (logged every step). ``"forward"``: always the
            separate no-grad forward over every response before the update, used for the ratio, the KL
            damping and the mismatch metric (the exact behaviour of earlier versions).
        lr: learning rate (AdamW).
        weight_decay: AdamW weight decay on matrices (1-D parameters exempt, as in the SFT stage).
        betas: AdamW betas.
        optimizer: "adamw" or "adamw8bit" (bitsandbytes).
        grad_clip: max gradient norm; 0 disables clipping.
        domain_key: what DRPO treats as a domain: "domain" (the clinical domain, paper) or "dataset"
            ("domain/dataset", the released code).
        trace_every: keep a rollout trace every this many steps (written by ``RolloutTraceWriter``); 0 = never.
        engine_dir: where the rollout engine keeps its copy of the LM; default: ``<run folder>/engine``.
        dynamic_sampling: DAPO-style dynamic sampling (drop groups whose rewards are all equal, refill
            with prompts drawn from the data module's ``extra_batch``, up to a cap of generation batches;
            single process only); None (default) trains on every group of the batch.

    After each step the module publishes the step's per-domain statistics (share of zero-variance groups,
    mean reward, over every generated group) as ``last_domain_stats``; :class:`qoq.callbacks.DomainStatsFeedback`,
    which the module adds to the trainer, hands them to the data module (``sampler: adaptive``).
    """

    def __init__(
        self,
        policy: Policy,
        init_policy_from: str | None = None,
        advantage: AdvantageEstimator | None = None,
        reward: RewardFn | None = None,
        rollout: RolloutEngine | None = None,
        sampling: SamplingParams | None = None,
        eval_sampling: SamplingParams | None = None,
        loss: LossConfig | None = None,
        ppo_epochs: int = 1,
        mini_batches: int = 1,
        micro_batch_size: int | None = None,
        token_budget: int | None = None,
        old_logprobs: Literal["reuse", "forward"] = "reuse",
        lr: float = 1e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        optimizer: Literal["adamw", "adamw8bit"] = "adamw",
        grad_clip: float = 1.0,
        domain_key: Literal["domain", "dataset"] = "domain",
        trace_every: int = 10,
        engine_dir: str | None = None,
        dynamic_sampling: DynamicSampling | None = None,
    ) -> None:
        super().__init__()
        _check_settings(sampling, lr, weight_decay, ppo_epochs, mini_batches, micro_batch_size, init_policy_from)
        # Checkpoints keep the components' config, never pickled objects, so they load with
        # weights_only=True: LightningCLI hands over the parsed config (with class paths, so
        # `load_from_checkpoint` and `qoq test --ckpt_path` rebuild the model); built in Python, the
        # component objects are left out and the dataclasses are stored as dicts.
        from_config = _given_hyperparameters.get() is not None
        objects = ["policy", "advantage", "reward", "rollout", "sampling", "eval_sampling", "loss", "dynamic_sampling"]
        self.save_hyperparameters(ignore=None if from_config else objects)
        self.automatic_optimization = False
        self.policy = policy
        self.advantage = advantage if advantage is not None else DRPO()
        self.reward = reward if reward is not None else RewardFn()
        self.rollout = rollout if rollout is not None else HFEngine()
        self.sampling = sampling or SamplingParams()
        self.eval_sampling = eval_sampling or SamplingParams(n=1, temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
        self.loss_cfg = loss or LossConfig()
        for name, value in (("sampling", self.sampling), ("eval_sampling", self.eval_sampling), ("loss", self.loss_cfg)):
            if not isinstance(self.hparams.get(name), dict):
                self.hparams[name] = asdict(value)
        self.dynamic_sampling = dynamic_sampling
        if dynamic_sampling is not None and not isinstance(self.hparams.get("dynamic_sampling"), dict):
            self.hparams["dynamic_sampling"] = asdict(dynamic_sampling)
        self.ppo_epochs = ppo_epochs
        self.mini_batches = mini_batches
        self.micro_batch_size = micro_batch_size
        if token_budget is not None and token_budget < 1:
            raise ValueError(f"token_budget must be >= 1 or None, got {token_budget}")
        self.token_budget = token_budget
        if old_logprobs not in ("reuse", "forward"):
            raise ValueError(f"old_logprobs must be 'reuse' or 'forward', got {old_logprobs!r}")
        self.old_logprobs = old_logprobs
        self.domain_key = domain_key
        self.trace_every = trace_every
        self.engine_dir = engine_dir
        self.init_policy_from = init_policy_from
        self.reference: Policy | None = None
        self.domain_names: dict[int, str] = {}  # DRPO domain id -> key, for logging; saved in checkpoints
        self.last_rollout_trace: list[dict[str, Any]] | None = None
        #: Domain name -> statistics of the last training step (read by DomainStatsFeedback).
        self.last_domain_stats: dict[str, dict[str, float]] | None = None
        self._step_keys: set[str] = set()  # every per-step metric name logged so far
        self._configured = False
        self._engine_ready = False
        self._resume_rng: dict[str, Tensor] | None = None  # RNG state of a loaded checkpoint, set before the next step
        self._eval_records: list[Any] = []

    # ------------------------------------------------------------------ construction
    def configure_model(self) -> None:
        """Build the policy's weights and, when a KL term needs it, the frozen reference policy."""
        if self._configured:
            return
        self.policy.configure_model()
        if self.init_policy_from:
            load_policy_weights(self.policy, self.init_policy_from)
        needs_ref = self.loss_cfg.kl_coef > 0 or getattr(self.advantage, "needs_kl", False)
        if needs_ref and self.reference is None and self.policy.lora is None:
            self.reference = self.policy.frozen_copy()
        self._configured = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("PolicyOptimization: the policy has no trainable parameters (check `freeze`)")
        hp = self.hparams
        groups = decay_groups(params, hp.weight_decay)
        if hp.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=hp.lr, betas=tuple(hp.betas))
        return torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))

    def _ensure_engine(self) -> None:
        if self._engine_ready:
            return
        workdir = Path(self.engine_dir or Path(self.trainer.default_root_dir) / "engine")
        if self.trainer.world_size > 1:  # one engine per rank, each with its own copy of the LM
            workdir = workdir / f"rank{self.trainer.global_rank}"
        with strategies.full_parameters(self.trainer.model):  # sharded weights: gathered for the engine
            self.rollout.setup(
                self.policy.lm,
                self.policy.tokenizer,
                workdir,
                suppress_token_ids=self.policy.suppress_token_ids,
                eos_token_ids=self.policy.eos_token_ids,
            )
            self.rollout.sync_weights(self.policy.lm_weights_for_sync())
        self._engine_ready = True

    def on_fit_start(self) -> None:
        if self.dynamic_sampling is not None and self.trainer.world_size > 1:
            raise ValueError("dynamic_sampling is single-process only (ranks would refill to different sizes)")
        self._ensure_engine()

    def configure_callbacks(self) -> list[L.Callback]:
        """The per-domain statistics feedback to the data module (a no-op unless it samples adaptively),
        and, unless the trainer has one, the :class:`~qoq.callbacks.predictions.PredictionWriter` of
        ``qoq predict``."""
        from qoq.callbacks.feedback import DomainStatsFeedback
        from qoq.callbacks.predictions import PredictionWriter

        callbacks: list[L.Callback] = [DomainStatsFeedback()]
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            callbacks.append(PredictionWriter())
        return callbacks

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resume_rng is not None:
            strategies.set_rng_state(self._resume_rng)
            self._resume_rng = None

    def on_validation_start(self) -> None:
        self._ensure_engine()

    def on_test_start(self) -> None:
        self._ensure_engine()

    def on_predict_start(self) -> None:
        self._ensure_engine()

    def teardown(self, stage: str) -> None:
        # The engine outlives a stage (fit then test reuse it); it is closed with the process.
        pass

    # ------------------------------------------------------------------ the RL step
    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        timers: dict[str, float] = {}
        clock = _Clock(timers)
        collected = self._collect(batch, clock)
        batch, rollout, scored, embeds = collected.batch, collected.rollout, collected.scored, collected.embeds
        rewards = scored.total.to(self.device, torch.float32)  # [N]

        mask = rollout.response_mask
        plan = self._mini_batch_plan(rollout, len(batch))
        with clock("logprobs"):
            with torch.no_grad():
                ref_logp = self._reference_logprobs(batch, embeds, rollout)  # [N, R] or None
                old_logp, known, behaviour_logp = self._old_logprobs(embeds, rollout, plan, ref_logp is not None)
        self._check_inputs(batch, rollout, old_logp, ref_logp)

        with clock("advantage"):
            prompt_keys = [self._domain_key(batch, i) for i in range(len(batch))]  # per prompt, not per row
            prompt_domains = torch.tensor([self._domain_id(k) for k in prompt_keys], device=self.device)  # [P]
            domain_ids = prompt_domains[rollout.prompt_index]  # [N]
            keys = [prompt_keys[i] for i in rollout.prompt_index.tolist()]
            kl_seq = None
            if behaviour_logp is not None:
                kl_seq = losses.response_kl(behaviour_logp, ref_logp, mask, "k3")  # [N]
            adv_out = self._advantages(rewards, rollout.prompt_index, domain_ids, kl_seq, scored.components)
            advantages = adv_out.advantages.to(self.device)  # [N]
        self._check_finite(batch, rollout, rewards, None, "reward")
        self._check_finite(batch, rollout, advantages, None, "advantage")

        with clock("update"):
            update_metrics = self._update(
                batch, rollout, old_logp, ref_logp, advantages, [len(e) for e in embeds], known=known, plan=plan
            )

        with clock("sync"), strategies.full_parameters(self.trainer.model):  # sharded weights: gathered
            report = self.rollout.sync_weights(self.policy.lm_weights_for_sync())

        self.last_domain_stats = self._domain_stats(collected)
        extra = {f"train/{k}": v for k, v in collected.metrics.items()}
        for domain, stats in self.last_domain_stats.items():
            extra[f"train/zero_var_frac/{domain}"] = stats["zero_var_frac"]
        self._log_step(batch, rollout, scored, rewards, advantages, adv_out.metrics, keys, old_logp, update_metrics,
                       report, timers, extra)
        if self.trace_every and self.global_step % self.trace_every == 0:
            self.last_rollout_trace = _trace(batch, rollout, scored, advantages, self.global_step)
        else:
            self.last_rollout_trace = None

    def _collect(self, batch: PromptBatch, clock: _Clock) -> Collected:
        """The step's rollouts and rewards: of its batch, or with dynamic sampling, of the informative
        groups of up to ``max_gen_batches`` generations (extra prompts from the data module)."""

        def generate(prompts: PromptBatch, k: int) -> tuple[list[Tensor], RolloutBatch, RewardOutput]:
            params = self.sampling
            if params.seed is not None:  # a distinct seed per step and per generation of the step
                params = replace(params, seed=params.seed + self.global_step + 1_000_003 * k)
            with clock("rollout"):
                with torch.no_grad():
                    embeds = self.policy.prompt_embeds(prompts)  # P x [L_i, H]
                rollout = self.rollout.generate([e.detach() for e in embeds], params)
                rollout = _to_device(rollout, self.device)
            with clock("reward"):
                scored = self.reward(rollout.texts, [prompts.targets[i] for i in rollout.prompt_index.tolist()])
            return embeds, rollout, scored

        if self.dynamic_sampling is None:
            return collect_plain(batch, generate)
        source = getattr(self.trainer.datamodule, "extra_batch", None)
        if source is None:
            raise ValueError(
                "dynamic_sampling draws more prompts from the data module's extra_batch(stream_index, draw); "
                "fit with a qoq data module (e.g. qoq.data.MultiDomainDataModule)"
            )

        def draw(k: int) -> PromptBatch:
            with clock("data"):
                return source(batch.stream_index, k).to(self.device)

        pad_id = self.policy.tokenizer.pad_token_id
        return collect_dynamic(batch, generate, draw, self.dynamic_sampling, 0 if pad_id is None else int(pad_id))

    def _domain_stats(self, collected: Collected) -> dict[str, dict[str, float]]:
        """Per clinical domain, over every group generated this step (all ranks): zero-variance share, mean reward."""
        from qoq.data.domains import DOMAINS

        rewards = collected.generated_rewards.to(self.device, torch.float32)
        groups = collected.generated_groups.to(self.device)
        domains = collected.generated_domains.to(self.device)
        if self.trainer.world_size > 1:  # every rank's data module gets the same statistics
            gathered = self.all_gather({"r": rewards, "g": groups, "d": domains})
            span = int(gathered["g"].max()) + 1  # ranks' groups are disjoint: offset group ids by rank
            offsets = torch.arange(gathered["g"].shape[0], device=self.device)[:, None] * span
            rewards, groups, domains = gathered["r"].flatten(), (gathered["g"] + offsets).flatten(), gathered["d"].flatten()
        stats = domain_batch_stats(rewards.cpu(), groups.cpu(), domains.cpu(), tol=self._zero_var_tol)
        return {DOMAINS[d]: s for d, s in stats.items()}

    @property
    def _zero_var_tol(self) -> float:
        return self.dynamic_sampling.tol if self.dynamic_sampling is not None else 1e-8

    @property
    def _train_temperature(self) -> float:
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0

    def _domain_key(self, batch: PromptBatch, i: int) -> str:
        return batch.domains[i] if self.domain_key == "domain" else f"{batch.domains[i]}/{batch.datasets[i]}"

    def _domain_id(self, key: str) -> int:
        """A stable id for a domain key: the same on every rank and in every run (CRC-32 of the key)."""
        ident = zlib.crc32(key.encode())
        self.domain_names[ident] = key
        return ident

    def _old_logprobs(
        self, embeds: list[Tensor], rollout: RolloutBatch, plan: list[list[Tensor]], have_ref: bool
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Old log-probs known before the update, and the log-probs DRPO's KL damping compares with the reference.

        See ``old_logprobs`` in the class docstring for the policy.

        Args:
            embeds: P prompt embeddings (no grad).
            rollout: the N responses.
            plan: the update's rows per epoch and mini-batch (:meth:`_mini_batch_plan`).
            have_ref: whether reference log-probs exist (KL damping needs them).

        Returns:
            ``old_logp [N, R]`` (0 on rows not computed yet), ``known [N]`` bool (rows whose old log-probs are
            in ``old_logp``; the others are filled by their first gradient pass in :meth:`_update`), and the
            ``[N, R]`` behaviour log-probs for KL damping, or None when the estimator does not damp.
        """
        n = len(rollout.prompt_index)
        device = rollout.response_ids.device
        damping = have_ref and getattr(self.advantage, "needs_kl", False)
        need = torch.ones(n, dtype=torch.bool, device=device)  # rows that get the no-grad forward now
        behaviour = None
        if self.old_logprobs == "reuse":
            need[plan[0][0]] = False  # the first mini-batch's own gradient pass gives theirs
            if damping and self._engine_logprobs_are_exact(rollout):
                behaviour = rollout.engine_logprobs.to(device, torch.float32)
            elif damping:
                need[:] = True
        old_logp = torch.zeros(rollout.response_ids.shape, dtype=torch.float32, device=device)  # [N, R]
        rows = torch.nonzero(need).flatten()
        if len(rows):
            old_logp[rows] = self.policy.response_logprobs(
                embeds,
                rollout.response_ids[rows],
                rollout.response_mask[rows],
                rollout.prompt_index[rows],
                temperature=self._train_temperature,
            )[0]
        if damping and behaviour is None:
            behaviour = old_logp
        return old_logp, need, behaviour

    def _engine_logprobs_are_exact(self, rollout: RolloutBatch) -> bool:
        """Whether the engine's log-probs are ``log_softmax(logits / T)`` up to suppressed tokens (no top-k/p cut)."""
        params = self.sampling
        return rollout.engine_logprobs is not None and params.top_k <= 0 and params.top_p >= 1.0

    def _reference_logprobs(self, batch: PromptBatch, embeds: list[Tensor], rollout: RolloutBatch) -> Tensor | None:
        if not (self.loss_cfg.kl_coef > 0 or getattr(self.advantage, "needs_kl", False)):
            return None
        args = (rollout.response_ids, rollout.response_mask, rollout.prompt_index)
        if self.reference is not None:
            ref_embeds = self.reference.prompt_embeds(batch)
            return self.reference.response_logprobs(ref_embeds, *args, temperature=self._train_temperature)[0]
        with self.policy.reference_mode():
            ref_embeds = self.policy.prompt_embeds(batch)
            return self.policy.response_logprobs(ref_embeds, *args, temperature=self._train_temperature)[0]

    def _advantages(
        self, rewards: Tensor, group_ids: Tensor, domain_ids: Tensor, kl: Tensor | None, components: dict[str, Tensor]
    ):
        """Advantages over the global batch: under data parallelism every rank sees every rank's rewards.

        Estimators with ``needs_components`` also get the reward components ``{name: [N]}`` and weights.
        """
        extra: dict[str, Any] = {}
        if getattr(self.advantage, "needs_components", False):
            comps = {k: v.to(self.device, torch.float32) for k, v in components.items()}
            if self.trainer.world_size > 1:
                comps = {k: v.flatten() for k, v in self.all_gather(comps).items()}
            extra = {"components": comps, "weights": dict(self.reward.weights)}
        if self.trainer.world_size <= 1:
            return self.advantage(rewards, group_ids, domain_ids, kl=kl, **extra)
        n_local = rewards.shape[0]
        groups_local = int(group_ids.max()) + 1
        gathered = self.all_gather(
            {"r": rewards, "g": group_ids, "d": domain_ids, "k": kl if kl is not None else torch.zeros_like(rewards)}
        )
        # ranks' groups are disjoint: offset group ids by rank
        offsets = torch.arange(gathered["g"].shape[0], device=self.device)[:, None] * groups_local
        out = self.advantage(
            gathered["r"].flatten(),
            (gathered["g"] + offsets).flatten(),
            gathered["d"].flatten(),
            kl=gathered["k"].flatten() if kl is not None else None,
            **extra,
        )
        rank = self.trainer.global_rank
        out.advantages = out.advantages[rank * n_local : (rank + 1) * n_local]
        return out

    def _check_inputs(self, batch: PromptBatch, rollout: RolloutBatch, old_logp: Tensor, ref_logp: Tensor | None) -> None:
        """The update's inputs are finite, and a mismatch correction has the engine's log-probs it needs."""
        if self.loss_cfg.mismatch is not None and rollout.engine_logprobs is None:
            raise ValueError(
                f"loss.mismatch={self.loss_cfg.mismatch!r} needs the rollout engine's log-probs, and "
                f"{type(self.rollout).__name__} reported none"
            )
        if rollout.engine_logprobs is not None:
            self._check_finite(batch, rollout, rollout.engine_logprobs, None, "rollout (engine log-probs)")
        if ref_logp is not None:
            self._check_finite(batch, rollout, ref_logp, None, "reference log-probs")
        self._check_finite(batch, rollout, old_logp, None, "old log-probs")

    def _check_finite(self, batch: PromptBatch, rollout: RolloutBatch, values: Tensor, rows: Tensor | None, phase: str) -> None:
        """Raise :class:`NonFiniteError` naming the step, the phase and the prompt ids of non-finite rows.

        Args:
            batch: the step's prompts.
            rollout: the step's responses.
            values: ``[n]`` or ``[n, R]`` values of the responses ``rows`` (every response when None);
                ``[n, R]`` values count on response tokens only.
            rows: ``[n]`` response rows, or None.
            phase: where in the step the values come from (for the message).
        """
        rows = rows if rows is not None else torch.arange(len(rollout.prompt_index), device=values.device)
        mask = rollout.response_mask[rows].to(values.device) if values.ndim == 2 else None
        bad = losses.nonfinite_rows(values, mask)
        if bad:
            raise NonFiniteError(
                f"step {self.global_step}, phase '{phase}': non-finite values in {len(bad)} response(s), prompts "
                f"{self._prompt_ids(batch, rollout, rows[bad])}"
            )

    @staticmethod
    def _prompt_ids(batch: PromptBatch, rollout: RolloutBatch, rows: Tensor) -> list[str]:
        return sorted({str(batch.ids[i]) for i in rollout.prompt_index[rows].tolist()})

    def _micro_batches(self, rows: Tensor, rollout: RolloutBatch, prompt_lengths: list[int] | None) -> list[Tensor]:
        """Split a mini-batch's rows into micro-batches by ``micro_batch_size`` and ``token_budget``."""
        size = self.micro_batch_size or len(rows)
        if self.token_budget is None or prompt_lengths is None:
            return list(rows.split(size))
        width = rollout.response_ids.shape[1]  # R: every row is padded to it
        lengths = [prompt_lengths[i] for i in rollout.prompt_index[rows].tolist()]
        out, start, longest = [], 0, 0
        for k, length in enumerate(lengths):
            longest_k = max(longest, length)
            if k > start and ((k + 1 - start) * (longest_k + width) > self.token_budget or k - start >= size):
                out.append(rows[start:k])
                start, longest_k = k, length
            longest = longest_k
        out.append(rows[start:])
        return out

    def _grad_logprobs(self, batch: PromptBatch, rollout: RolloutBatch, micro: Tensor) -> tuple[Tensor, Tensor | None]:
        """Current-policy log-probs (and entropy) of the ``micro`` rows, with gradients.

        Only the prompts these rows answer are embedded (encoders + projector + text embeddings, with grad
        into the trainable ones), each once.
        """
        index = rollout.prompt_index[micro]  # [n_micro]
        used = torch.unique(index)  # [U] sorted
        if len(used) == len(batch):
            embeds = self.policy.prompt_embeds(batch)
        else:
            embeds = self.policy.prompt_embeds(batch.select(used.tolist()))
            index = torch.searchsorted(used, index)  # prompt positions in the sub-batch
        return self.policy.response_logprobs(
            embeds,
            rollout.response_ids[micro],
            rollout.response_mask[micro],
            index,
            temperature=self._train_temperature,
            with_entropy=self.loss_cfg.entropy_coef > 0,
        )

    def _mini_batch_plan(self, rollout: RolloutBatch, num_groups: int) -> list[list[Tensor]]:
        """The update's response rows, per epoch and mini-batch (mini-batches split by group).

        The group order is shuffled per epoch when ``mini_batches > 1``, by a generator seeded with the global
        step (reproducible and resumable).
        """
        group_order = torch.arange(num_groups)
        gen = torch.Generator().manual_seed(int(self.global_step))
        index = rollout.prompt_index.cpu()
        plan = []
        for _ in range(self.ppo_epochs):
            if self.mini_batches > 1:
                group_order = torch.randperm(num_groups, generator=gen)
            plan.append(
                [
                    torch.nonzero(torch.isin(index, groups)).flatten().to(rollout.prompt_index.device)  # [n_mb]
                    for groups in group_order.chunk(self.mini_batches)
                ]
            )
        return plan

    def _update(
        self, batch: PromptBatch, rollout: RolloutBatch, old_logp: Tensor, ref_logp: Tensor | None, advantages: Tensor,
        prompt_lengths: list[int] | None = None, known: Tensor | None = None, plan: list[list[Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """``ppo_epochs`` x ``mini_batches`` optimizer steps; returns the mean of the loss metrics.

        Args:
            batch: the P prompts.
            rollout: their N responses.
            old_logp: ``[N, R]`` old log-probs; rows not in ``known`` are filled in place, by the detached
                log-probs of their first gradient pass (which must come before any optimizer step: the first
                mini-batch of the first epoch).
            ref_logp: ``[N, R]`` reference log-probs, or None.
            advantages: ``[N]``.
            prompt_lengths: P prompt lengths (for ``token_budget``).
            known: ``[N]`` bool, rows whose ``old_logp`` is given; None: all.
            plan: rows per epoch and mini-batch (:meth:`_mini_batch_plan`); None: computed here.
        """
        opt = self.optimizers()
        cfg = self.loss_cfg
        collected: dict[str, list[Tensor]] = defaultdict(list)
        plan = plan if plan is not None else self._mini_batch_plan(rollout, len(batch))
        known = known.clone() if known is not None else None
        stepped = False
        for epoch in plan:
            for rows in epoch:
                normalizer = losses.loss_normalizer(rollout.response_mask[rows], cfg.agg)
                opt.zero_grad(set_to_none=True)
                step_metrics: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
                for micro in self._micro_batches(rows, rollout, prompt_lengths):
                    # through the sharded root (FSDP1 hooks see the forward); a plain call otherwise
                    logp, entropy = strategies.root_call(self, "_grad_logprobs", batch, rollout, micro)
                    if known is not None and not bool(known[micro].all()):
                        if stepped:
                            raise RuntimeError("PolicyOptimization._update: old log-probs missing after an optimizer step")
                        fill = micro[~known[micro]]
                        old_logp[fill] = logp.detach()[~known[micro]]
                        known[fill] = True
                    self._check_finite(batch, rollout, logp, micro, "update (current log-probs)")
                    is_weights = None
                    if cfg.mismatch is not None:
                        is_weights = losses.mismatch_weights(
                            old_logp[micro], rollout.engine_logprobs[micro], rollout.response_mask[micro],
                            cfg.mismatch, low=cfg.mismatch_low, high=cfg.mismatch_high, seq_agg=cfg.mismatch_seq_agg,
                        )
                    loss, metrics = losses.policy_loss(
                        logp,
                        old_logp[micro],
                        advantages[micro],
                        rollout.response_mask[micro],
                        eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high,
                        dual_clip=cfg.dual_clip,
                        agg=cfg.agg,
                        normalizer=normalizer,
                        ref_logp=ref_logp[micro] if ref_logp is not None else None,
                        kl_coef=cfg.kl_coef,
                        kl_kind=cfg.kl_kind,
                        entropy=entropy,
                        entropy_coef=cfg.entropy_coef,
                        is_weights=is_weights,
                        ratio_level=cfg.ratio_level,
                    )
                    if not torch.isfinite(loss):
                        raise NonFiniteError(
                            f"step {self.global_step}, phase 'update (loss)': non-finite loss {float(loss)} for prompts "
                            f"{self._prompt_ids(batch, rollout, micro)}"
                        )
                    self.manual_backward(loss)
                    # micro-batch metrics share the step's normaliser: their sum is the step's value
                    for k, v in metrics.items():
                        step_metrics[k] += torch.as_tensor(v, dtype=torch.float32).detach().cpu()
                    step_metrics["loss"] += loss.detach().float().cpu()
                for k, v in step_metrics.items():
                    collected[k].append(v)
                if self.hparams.grad_clip > 0:
                    norm = strategies.clip_grad_norm(
                        self.trainer.model, [p for p in self.policy.parameters() if p.requires_grad],
                        self.hparams.grad_clip,
                    )
                    collected["grad_norm"].append(torch.as_tensor(norm, dtype=torch.float32).detach().cpu())
                    if not math.isfinite(float(norm)):
                        raise NonFiniteError(
                            f"step {self.global_step}, phase 'update (gradients)': non-finite gradient norm for prompts "
                            f"{self._prompt_ids(batch, rollout, rows)}"
                        )
                opt.step()
                stepped = True
        return {k: torch.stack(v).mean() for k, v in collected.items()}

    # ------------------------------------------------------------------ logging
    def _log_step(self, batch, rollout, scored, rewards, advantages, adv_metrics, keys, old_logp, update_metrics,
                  report, timers, extra=None) -> None:
        mask = rollout.response_mask
        lengths = mask.sum(-1).float()
        logs: dict[str, Any] = {
            "train/reward": rewards.mean(),
            "train/response_length": lengths.mean(),
            "train/reward_errors": float(scored.errors),
            "train/zero_std_groups": _zero_std_fraction(rewards, rollout.prompt_index),
            "train/sync_ms": report.seconds * 1000.0,
        }
        if rollout.truncated is not None:
            logs["train/truncated_frac"] = rollout.truncated.float().mean()
        for name, values in scored.components.items():
            finite = values[torch.isfinite(values)]
            if finite.numel():
                logs[f"train/reward_{name}"] = finite.mean()
        for k, v in update_metrics.items():
            logs[f"train/{k}"] = v
        by_domain: dict[str, list[int]] = defaultdict(list)
        for row, i in enumerate(rollout.prompt_index.tolist()):
            by_domain[batch.domains[i]].append(row)
        for domain, rows in by_domain.items():
            idx = torch.tensor(rows, device=rewards.device)
            logs[f"train/reward/{domain}"] = rewards[idx].mean()
            logs[f"train/adv_scale/{domain}"] = advantages[idx].abs().mean()
        for k, v in (adv_metrics or {}).items():
            per_domain = v.items() if isinstance(v, dict) else [(None, v)]
            for dom, value in per_domain:
                if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                    name = k if dom is None else f"{k}/{self._metric_key(dom)}"
                    logs[f"train/advantage/{name}"] = float(value)
        if rollout.engine_logprobs is not None:
            diff = (rollout.engine_logprobs.to(old_logp) - old_logp).abs()[mask]
            if diff.numel():
                logs["train/logp_mismatch_mean"] = diff.mean()
                logs["train/logp_mismatch_max"] = diff.max()
        logs.update(extra or {})
        for k, v in timers.items():
            logs[f"time/{k}"] = v
        total = sum(timers.values())
        if total > 0:
            for k, v in timers.items():
                logs[f"time_share/{k}"] = v / total
        # Per-domain keys are absent on steps without that domain: log NaN there, or Lightning's result
        # collection would repeat the domain's last value.
        self._step_keys.update(logs)
        logs.update({k: float("nan") for k in self._step_keys - logs.keys()})
        self.log_dict({k: float(v) for k, v in logs.items()}, on_step=True, batch_size=len(batch))
        self.log("reward", rewards.mean(), prog_bar=True, on_step=True, logger=False, batch_size=len(batch))

    def _metric_key(self, key: Any) -> str:
        if isinstance(key, tuple):
            return "/".join(self._metric_key(k) for k in key)
        if isinstance(key, int) and key in self.domain_names:
            return self.domain_names[key]
        return str(key)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Answer prompts that need no gold fields: one row per response (``eval_sampling``) with its
        reasoning, boxes and answer (:func:`qoq.callbacks.predictions.prediction_row`)."""
        from qoq.callbacks.predictions import prediction_row

        rollout = self._generate_eval(batch)
        return [
            prediction_row(batch, i, text, self.reward.synonyms)
            for text, i in zip(rollout.texts, rollout.prompt_index.tolist(), strict=True)
        ]

    def _generate_eval(self, batch: PromptBatch) -> RolloutBatch:
        with torch.no_grad():
            embeds = self.policy.prompt_embeds(batch)
            return self.rollout.generate([e.detach() for e in embeds], self.eval_sampling)

    def _evaluate(self, batch: PromptBatch, split: str) -> dict[str, Any]:
        from qoq.callbacks.metrics import EvalRecord

        rollout = self._generate_eval(batch)
        targets = [batch.targets[i] for i in rollout.prompt_index.tolist()]
        scored = self.reward(rollout.texts, targets)
        records = []
        for row, i in enumerate(rollout.prompt_index.tolist()):
            target = batch.targets[i]
            text = rollout.texts[row]
            iou = scored.components.get("iou")
            iou_value = float(iou[row]) if iou is not None and math.isfinite(float(iou[row])) else None
            records.append(
                EvalRecord(
                    id=batch.ids[i],
                    domain=batch.domains[i],
                    dataset=batch.datasets[i],
                    origin=batch.origins[i] if batch.origins else "real",
                    labels=tuple(target.labels),
                    gold=frozenset(target.answer),
                    response=text,
                    predicted=extract_answer(text, target.labels, self.reward.synonyms),
                    pred_boxes=[tuple(b) for b in _safe_boxes(text)],
                    gold_boxes=[tuple(float(x) for x in b) for b in (target.boxes.tolist() if target.boxes is not None else [])],
                    rewards={k: float(v[row]) for k, v in scored.components.items()} | {"total": float(scored.total[row])},
                    iou=iou_value,
                )
            )
        if split != "predict":  # Lightning has no logging in predict hooks
            self.log(f"{split}/reward", scored.total.float().mean(), batch_size=len(batch), sync_dist=True)
        return {"eval_records": records}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qoq"] = {"advantage": self.advantage.state_dict(), "domain_names": dict(self.domain_names)}
        checkpoint["qoq"]["rng"] = strategies.rng_state()  # exact resume (dropout etc.; sampling is seeded per step)
        checkpoint["tokenizer_fingerprint"] = self.policy.tokenizer_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = getattr(self._trainer, "ckpt_path", None) or "checkpoint"
        self.policy.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), source)
        state = checkpoint.get("qoq", {})
        if "advantage" in state:
            self.advantage.load_state_dict(state["advantage"])
        self.domain_names = dict(state.get("domain_names", {}))
        # applied before the next training step: creating the resumed data iterator draws from the RNG
        self._resume_rng = state.get("rng")
        self._engine_ready = False  # weights changed: the engine must be re-synced


def _check_settings(
    sampling: SamplingParams | None,
    lr: float,
    weight_decay: float,
    ppo_epochs: int,
    mini_batches: int,
    micro_batch_size: int | None,
    init_policy_from: str | None,
) -> None:
    """Refuse settings that cannot train, before any data or weights are built.

    Raises:
        ValueError: names every bad setting (one line).
        FileNotFoundError: ``init_policy_from`` names no file.
    """
    n = (sampling or SamplingParams()).n
    problems = [
        message
        for bad, message in (
            (n < 2, f"sampling.n={n}: group-relative advantages (every estimator qoq ships) need >= 2 responses "
             "per prompt; with one they are all zero and nothing trains"),
            (not lr > 0, f"lr={lr} must be > 0"),
            (weight_decay < 0, f"weight_decay={weight_decay} must be >= 0"),
            (ppo_epochs < 1, f"ppo_epochs={ppo_epochs} must be >= 1"),
            (mini_batches < 1, f"mini_batches={mini_batches} must be >= 1"),
            (micro_batch_size is not None and micro_batch_size < 1,
             f"micro_batch_size={micro_batch_size} must be >= 1 or None"),
        )
        if bad
    ]
    if problems:
        raise ValueError("PolicyOptimization: " + "; ".join(problems))
    if init_policy_from and not Path(init_policy_from).expanduser().is_file():
        raise FileNotFoundError(f"init_policy_from: no checkpoint at {init_policy_from} (run the SFT stage first?)")


def load_policy_weights(policy: Policy, ckpt_path: str | Path) -> None:
    """Load a policy's weights from a ``Policy`` (SFT) or ``PolicyOptimization`` checkpoint.

    Raises:
        FileNotFoundError: no checkpoint at ``ckpt_path``.
        ValueError: the checkpoint was trained with another tokenizer.
        RuntimeError: the checkpoint's tensors do not fit the policy (names the missing / unexpected keys).
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_policy_from: no checkpoint at {path} (run the SFT stage first?)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    policy.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), path)
    state = checkpoint["state_dict"]
    if any(k.startswith("policy.") for k in state):
        state = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    missing, unexpected = policy.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"init_policy_from {path}: weights do not fit the policy; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


class _Clock:
    """Accumulates wall time per phase into a dict."""

    def __init__(self, timers: dict[str, float]) -> None:
        self.timers = timers

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timers[name] = self.timers.get(name, 0.0) + time.perf_counter() - start


def _to_device(rollout: RolloutBatch, device: torch.device) -> RolloutBatch:
    tensors = {
        name: value.to(device)
        for name, value in vars(rollout).items()
        if isinstance(value, Tensor)
    }
    return replace(rollout, **tensors)


def _zero_std_fraction(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Fraction of groups whose rewards are all equal (they carry no GRPO signal)."""
    groups = int(group_ids.max()) + 1
    lo = torch.full((groups,), float("inf"), device=rewards.device).scatter_reduce(0, group_ids, rewards, "amin")
    hi = torch.full((groups,), float("-inf"), device=rewards.device).scatter_reduce(0, group_ids, rewards, "amax")
    return (hi - lo <= 1e-8).float().mean()


def _safe_boxes(text: str) -> list:
    try:
        return parse_boxes(text)
    except Exception:  # noqa: BLE001 - a malformed box list is simply "no boxes" for reporting
        return []


def _trace(batch: PromptBatch, rollout: RolloutBatch, scored, advantages: Tensor, step: int) -> list[dict[str, Any]]:
    rows = []
    for row, i in enumerate(rollout.prompt_index.tolist()):
        rows.append(
            {
                "step": step,
                "prompt_id": batch.ids[i],
                "domain": batch.domains[i],
                "dataset": batch.datasets[i],
                "response": rollout.texts[row],
                "reward": float(scored.total[row]),
                "components": {k: float(v[row]) for k, v in scored.components.items()},
                "advantage": float(advantages[row]),
            }
        )
    return rows


__all__ = ["LossConfig", "NonFiniteError", "PolicyOptimization"]
