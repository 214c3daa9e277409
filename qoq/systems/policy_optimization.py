"""PolicyOptimization: the GRPO-family RL LightningModule (DRPO by default, any estimator by config).

The Lightning hooks and one step, ``collect -> score -> log-probs -> advantages -> update -> sync -> log``,
over an :class:`~qoq.systems.experience.Experience`; the pieces are plain functions in
:mod:`qoq.systems.dynamic_sampling`, :mod:`qoq.systems.update`, :mod:`qoq.systems.step_metrics` and :mod:`qoq.rl`.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from qoq import strategies
from qoq.models.optim import OptimizerCallable, adamw, build_optimizer
from qoq.models.policy import Policy, checkpoint_source
from qoq.rl import losses
from qoq.rl.advantages import DRPO, AdvantageEstimator
from qoq.rl.rewards import RewardFn
from qoq.rl.rollout.base import RolloutEngine
from qoq.rl.rollout.hf import HFEngine
from qoq.systems import evaluation, step_metrics, update
from qoq.systems.dynamic_sampling import DynamicSampling, collect, generator
from qoq.systems.experience import Clock, Experience, advantage_inputs, domain_ids
from qoq.systems.settings import check_settings, load_policy_weights, save_config
from qoq.systems.update import LossConfig, NonFiniteError, check_finite
from qoq.types import PromptBatch, RolloutBatch, SamplingParams


class PolicyOptimization(L.LightningModule):
    """GRPO-family reinforcement learning of a multimodal policy; DRPO with the default estimator.

    One training step: embed the prompts, sample ``n`` responses per prompt, score them, take reference
    and old log-probs, compute advantages with the injected estimator, run ``ppo_epochs`` x ``mini_batches``
    optimizer steps of the clipped surrogate (+ KL), push the new weights into the rollout engine.

    Args:
        policy: the multimodal policy (LM + encoders + projector).
        init_policy_from: checkpoint whose policy weights start the run (SFT warm start, an RL run); None: built.
        advantage: advantage estimator, e.g. ``qoq.rl.advantages.DRPO`` (default) or ``...GRPO``.
        reward: reward function (accuracy / IoU / format, weighted); default: the paper's weights.
        rollout: rollout engine: ``qoq.rl.rollout.VLLMEngine`` or ``qoq.rl.rollout.HFEngine`` (default).
        sampling: training rollout settings (``n`` is the group size).
        eval_sampling: evaluation generation settings (temperature 0 = greedy).
        loss: policy-loss settings.
        ppo_epochs: passes over each rollout batch.
        mini_batches: optimizer steps per rollout batch and epoch (responses split by group).
        micro_batch_size: responses per forward/backward (gradient accumulation); None = whole mini-batch.
        token_budget: most padded tokens per micro-batch, ``rows x (longest prompt + R)``; None = no limit.
        old_logprobs: ``"reuse"``: the first mini-batch's gradient pass gives its old log-probs (and DRPO's
            damping uses the engine's when sampling has no top-k / top-p cut); ``"forward"``: a no-grad
            forward over every response (:mod:`qoq.systems.update`).
        optimizer: the optimizer, given the parameter groups (weight decay on matrices only, 1-D parameters
            exempt, as in the SFT stage), e.g. ``{class_path: torch.optim.AdamW, init_args: {lr: 3.0e-4}}`` or
            ``bitsandbytes.optim.AdamW8bit``; None: AdamW with lr 1e-5, betas (0.9, 0.999), weight decay 0.01.
        grad_clip: max gradient norm; 0 disables clipping.
        domain_key: DRPO's domain: "domain" (clinical, paper) or "dataset" ("domain/dataset", released code).
        trace_every: keep a rollout trace every this many steps (``RolloutTraceWriter``); 0 = never.
        engine_dir: where the rollout engine keeps its copy of the LM; default: ``<run folder>/engine``.
        dynamic_sampling: DAPO-style dynamic sampling (:mod:`qoq.systems.dynamic_sampling`); None: every group.

    After each step ``last_domain_stats`` holds the per-domain statistics of every generated group;
    :class:`qoq.callbacks.DomainStatsFeedback` hands them to the data module.
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
        optimizer: OptimizerCallable | None = None,
        grad_clip: float = 1.0,
        domain_key: Literal["domain", "dataset"] = "domain",
        trace_every: int = 10,
        engine_dir: str | None = None,
        dynamic_sampling: DynamicSampling | None = None,
    ) -> None:
        super().__init__()
        self.sampling = sampling or SamplingParams()
        self.optimizer = optimizer if optimizer is not None else adamw(weight_decay=0.01)
        check_settings(self.sampling, self.optimizer, ppo_epochs, mini_batches, micro_batch_size,
                       token_budget, old_logprobs, init_policy_from)  # fmt: skip
        self.automatic_optimization = False
        self.policy = policy
        self.advantage = advantage if advantage is not None else DRPO()
        self.reward = reward if reward is not None else RewardFn()
        self.rollout = rollout if rollout is not None else HFEngine()
        self.eval_sampling = eval_sampling or SamplingParams(n=1, temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
        self.loss_cfg = loss or LossConfig()
        self.dynamic_sampling = dynamic_sampling
        save_config(self, inspect.currentframe(), {"sampling": self.sampling, "eval_sampling": self.eval_sampling,
                                                   "loss": self.loss_cfg, "dynamic_sampling": dynamic_sampling})  # fmt: skip
        temperature = self.sampling.temperature if self.sampling.temperature > 0 else 1.0
        self.update_settings = update.UpdateSettings(self.loss_cfg, ppo_epochs, mini_batches, micro_batch_size,
                                                     token_budget, grad_clip, temperature, old_logprobs)  # fmt: skip
        self.domain_key, self.trace_every, self.engine_dir = domain_key, trace_every, engine_dir
        self.init_policy_from = init_policy_from
        self.reference: Policy | None = None
        self.domain_names: dict[int, str] = {}  # DRPO domain id -> key, for logging; saved in checkpoints
        self.last_rollout_trace: list[dict[str, Any]] | None = None
        self.last_domain_stats: dict[str, dict[str, float]] | None = None  # read by DomainStatsFeedback
        self._step_keys: set[str] = set()  # every per-step metric name logged so far
        self._configured = self._engine_ready = False
        self._resume_rng: dict[str, Tensor] | None = None  # RNG state of a loaded checkpoint, set before the next step

    def configure_model(self) -> None:
        """Build the policy's weights and, when a KL term needs it, the frozen reference policy."""
        if self._configured:
            return
        self.policy.configure_model()
        if self.init_policy_from:
            load_policy_weights(self.policy, self.init_policy_from)
        if self._needs_reference and self.reference is None and self.policy.lora is None:
            self.reference = self.policy.frozen_copy()
        self._configured = True

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(self.optimizer, [p for p in self.policy.parameters() if p.requires_grad])

    def configure_callbacks(self) -> list[L.Callback]:
        """The domain-statistics feedback to the data module and, unless there is one, a ``PredictionWriter``."""
        from qoq.callbacks.feedback import DomainStatsFeedback
        from qoq.callbacks.predictions import PredictionWriter

        has_writer = any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks)
        return [DomainStatsFeedback()] + ([] if has_writer else [PredictionWriter()])

    def _ensure_engine(self) -> None:
        if self._engine_ready:
            return
        workdir = Path(self.engine_dir or Path(self.trainer.default_root_dir) / "engine")
        if self.trainer.world_size > 1:  # one engine per rank, each with its own copy of the LM
            workdir = workdir / f"rank{self.trainer.global_rank}"
        with strategies.full_parameters(self.trainer.model):  # sharded weights: gathered for the engine
            p = self.policy
            self.rollout.setup(p.lm, p.tokenizer, workdir, suppress_token_ids=p.suppress_token_ids,
                               eos_token_ids=p.eos_token_ids)  # fmt: skip
            self.rollout.sync_weights(self.policy.lm_weights_for_sync())
        self._engine_ready = True

    def on_fit_start(self) -> None:
        if self.dynamic_sampling is not None and self.trainer.world_size > 1:
            raise ValueError("dynamic_sampling is single-process only (ranks would refill to different sizes)")
        self._ensure_engine()

    on_validation_start = on_test_start = on_predict_start = _ensure_engine

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resume_rng is not None:
            strategies.set_rng_state(self._resume_rng)
            self._resume_rng = None

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        clock = Clock()
        exp = self._collect(batch, clock)  # rollouts, rewards, domain ids
        with clock("logprobs"), torch.no_grad():
            self._logprobs(exp)  # reference and old log-probs
        with clock("advantage"):
            self._advantages(exp)
        with clock("update"):
            metrics = self._update(exp)
        with clock("sync"), strategies.full_parameters(self.trainer.model):  # sharded weights: gathered
            report = self.rollout.sync_weights(self.policy.lm_weights_for_sync())
        self._log_step(exp, metrics, report.seconds, clock.timers)

    def _collect(self, batch: PromptBatch, clock: Clock) -> Experience:
        """The step's rollouts and rewards: of its batch, or of informative groups with dynamic sampling."""
        generate = generator(self.policy, self.rollout, self.reward, self.sampling, self.global_step, self.device, clock)
        source = getattr(self.trainer.datamodule, "extra_batch", None) if self.dynamic_sampling else None
        draw = (lambda k: source(batch.stream_index, k).to(self.device)) if source is not None else None
        pad_id = self.policy.tokenizer.pad_token_id
        got = collect(batch, generate, self.dynamic_sampling, draw, 0 if pad_id is None else int(pad_id))
        ids = domain_ids(got.batch, self.domain_key, self.domain_names).to(self.device)[got.rollout.prompt_index]
        u = self.update_settings
        plan = update.mini_batch_plan(got.rollout.prompt_index, len(got.batch), u.ppo_epochs, u.mini_batches, self.global_step)
        exp = Experience(got.batch, got.rollout, got.scored, got.embeds, ids, got, plan)
        if exp.rollout.engine_logprobs is not None:
            self._check(exp, exp.rollout.engine_logprobs, "rollout (engine log-probs)")
        self._check(exp, exp.rewards, "reward")
        return exp

    def _logprobs(self, exp: Experience) -> None:
        """Reference log-probs (KL term, damping) and the old log-probs known before the update."""
        r = exp.rollout
        if self._needs_reference:
            temperature = self.update_settings.temperature
            exp.ref_logp = update.reference_logprobs(self.policy, self.reference, exp.batch, r, temperature)
            self._check(exp, exp.ref_logp, "reference log-probs")
        damping = exp.ref_logp is not None and self.advantage.needs_kl
        exact = update.engine_logprobs_are_exact(r, self.sampling)
        exp.old = update.old_logprobs(self.policy, exp.embeds, r, exp.plan, self.update_settings, damping, exact)
        self._check(exp, exp.old.logp, "old log-probs")
        if exp.old.behaviour is not None:
            exp.kl = losses.response_kl(exp.old.behaviour, exp.ref_logp, r.response_mask, "k3")  # [N]

    def _advantages(self, exp: Experience) -> None:
        """Advantages over the global batch: under data parallelism every rank sees every rank's responses."""
        gather = functools.partial(strategies.gather_groups, self)
        weights = dict(getattr(self.reward, "weights", {}))  # a custom reward may have no weighted terms
        out = self.advantage(advantage_inputs(exp, weights, gather))
        n, rank = exp.rewards.shape[0], self.global_rank
        exp.advantages = out.advantages[rank * n : (rank + 1) * n].to(self.device)  # [N], this rank's rows
        exp.advantage_metrics = out.metrics
        self._check(exp, exp.advantages, "advantage")

    def _update(self, exp: Experience) -> dict[str, Tensor]:
        """The PPO loop (:func:`qoq.systems.update.ppo_update`) with this trainer's optimizer and backward;
        gradient forwards run through the sharded root (FSDP1 hooks see them), a plain call otherwise."""
        hooks = update.UpdateHooks(
            optimizer=self.optimizers(),
            grad_logprobs=lambda rows: strategies.root_call(self, "_grad_logprobs", exp.batch, exp.rollout, rows),
            backward=self.manual_backward,
            clip_grad=lambda max_norm: strategies.clip_grad_norm(
                self.trainer.model, [p for p in self.policy.parameters() if p.requires_grad], max_norm),
            step=self.global_step,
        )
        return update.ppo_update(exp.batch, exp.rollout, exp.old, exp.ref_logp, exp.advantages, exp.plan,
                                 self.update_settings, hooks, [len(e) for e in exp.embeds])  # fmt: skip

    def _grad_logprobs(self, batch: PromptBatch, rollout: RolloutBatch, micro: Tensor) -> tuple[Tensor, Tensor | None]:
        """:func:`qoq.systems.update.grad_logprobs` as a method (FSDP1 runs it as a forward of its root)."""
        return update.grad_logprobs(self.policy, batch, rollout, micro, self.update_settings)

    def _check(self, exp: Experience, values: Tensor, phase: str) -> None:
        check_finite(exp.batch, exp.rollout, values, None, phase, self.global_step)

    @property
    def _needs_reference(self) -> bool:
        return self.loss_cfg.kl_coef > 0 or self.advantage.needs_kl

    def _log_step(self, exp: Experience, metrics: dict[str, Tensor], sync_seconds: float, timers: dict[str, float]) -> None:
        gen, gather = exp.generated, lambda g, v: strategies.gather_groups(self, g, v)
        tol = self.dynamic_sampling.tol if self.dynamic_sampling is not None else 1e-8
        self.last_domain_stats = step_metrics.domain_stats(gen, gather, tol, self.device)
        logs = step_metrics.step_logs(exp, metrics, sync_seconds, timers, self.domain_names,
                                      self.last_domain_stats, self._step_keys)  # fmt: skip
        self.log_dict({k: float(v) for k, v in logs.items()}, on_step=True, batch_size=len(exp.batch))
        self.log("reward", exp.rewards.mean(), prog_bar=True, on_step=True, logger=False, batch_size=len(exp.batch))
        traced = self.trace_every and self.global_step % self.trace_every == 0
        self.last_rollout_trace = step_metrics.trace_rows(exp, self.global_step) if traced else None

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> dict[str, Any]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict[str, Any]]:
        """Answer prompts that need no gold fields: one row per response (``eval_sampling``)."""
        rollout = evaluation.generate(self.policy, self.rollout, batch, self.eval_sampling)
        return evaluation.prediction_rows(batch, rollout, self.reward.synonyms)

    def _evaluate(self, batch: PromptBatch, split: str) -> dict[str, Any]:
        rollout = evaluation.generate(self.policy, self.rollout, batch, self.eval_sampling)
        scored = self.reward(rollout.texts, [batch.targets[i] for i in rollout.prompt_index.tolist()])
        self.log(f"{split}/reward", scored.total.float().mean(), batch_size=len(batch), sync_dist=True)
        return {"eval_records": evaluation.eval_records(batch, rollout, scored, self.reward.synonyms)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qoq"] = {"advantage": self.advantage.state_dict(), "domain_names": dict(self.domain_names),
                             "rng": strategies.rng_state()}  # fmt: skip  (exact resume; sampling is seeded per step)
        checkpoint["tokenizer_fingerprint"] = self.policy.tokenizer_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.policy.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), checkpoint_source(self))
        state = checkpoint.get("qoq", {})
        if "advantage" in state:
            self.advantage.load_state_dict(state["advantage"])
        self.domain_names = dict(state.get("domain_names", {}))
        self._resume_rng = state.get("rng")  # applied before the next step: the resumed data iterator draws from it
        self._engine_ready = False  # weights changed: the engine must be re-synced


__all__ = ["LossConfig", "NonFiniteError", "PolicyOptimization", "load_policy_weights"]
