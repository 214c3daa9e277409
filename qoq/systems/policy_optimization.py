"""PolicyOptimization: the GRPO-family RL LightningModule (DRPO by default, any estimator by config).

The module holds the Lightning hooks and one step, ``collect -> score -> log-probs -> advantages ->
update -> sync -> log``, over an :class:`~qoq.systems.experience.Experience`. The pieces are plain
functions elsewhere: rollouts in :mod:`qoq.systems.dynamic_sampling`, the update in
:mod:`qoq.systems.update`, the step's metrics in :mod:`qoq.systems.step_metrics`, the math in :mod:`qoq.rl`.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor

from qoq import strategies
from qoq.models.optim import decay_groups
from qoq.models.policy import Policy
from qoq.rl import losses
from qoq.rl.advantages import DRPO, AdvantageEstimator, AdvantageInputs
from qoq.rl.rewards import RewardFn, RewardOutput
from qoq.rl.rollout.base import RolloutEngine
from qoq.rl.rollout.hf import HFEngine
from qoq.systems import step_metrics, update
from qoq.systems.dynamic_sampling import DynamicSampling, collect_dynamic, collect_plain
from qoq.systems.evaluation import eval_records
from qoq.systems.experience import Clock, Experience, domain_id, domain_ids
from qoq.systems.settings import check_settings, load_policy_weights
from qoq.systems.update import LossConfig, NonFiniteError, check_finite
from qoq.types import PromptBatch, RolloutBatch, SamplingParams


class PolicyOptimization(L.LightningModule):
    """GRPO-family reinforcement learning of a multimodal policy; DRPO with the default estimator.

    One training step: embed the prompts, sample ``n`` responses per prompt with the rollout engine, score
    them, compute advantages with the injected estimator, take old and reference log-probs, run
    ``ppo_epochs`` x ``mini_batches`` optimizer steps of the clipped surrogate (+ KL), and push the new
    weights into the engine. Swapping ``advantage`` swaps the algorithm.

    Args:
        policy: the multimodal policy (LM + encoders + projector).
        init_policy_from: a checkpoint whose policy weights start the run (the SFT warm start of
            ``qoq fit --model qoq.models.Policy``, or an earlier RL run); None keeps the built weights.
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
            ``rows x (longest prompt + response width) <= token_budget`` (at least one). Combined with
            ``micro_batch_size``, both limits hold.
        old_logprobs: ``"reuse"`` (default): the first mini-batch's responses take the detached log-probs
            of their own gradient pass as old log-probs (the weights have not moved yet), DRPO's KL damping
            uses the engine's log-probs when sampling has no top-k / top-p cut; ``"forward"``: a separate
            no-grad forward over every response (see :mod:`qoq.systems.update`).
        lr: learning rate (AdamW).
        weight_decay: AdamW weight decay on matrices (1-D parameters exempt, as in the SFT stage).
        betas: AdamW betas.
        optimizer: "adamw" or "adamw8bit" (bitsandbytes).
        grad_clip: max gradient norm; 0 disables clipping.
        domain_key: what DRPO treats as a domain: "domain" (the clinical domain, paper) or "dataset"
            ("domain/dataset", the released code).
        trace_every: keep a rollout trace every this many steps (written by ``RolloutTraceWriter``); 0 = never.
        engine_dir: where the rollout engine keeps its copy of the LM; default: ``<run folder>/engine``.
        dynamic_sampling: DAPO-style dynamic sampling (drop zero-variance groups, refill from the data
            module's ``extra_batch``; single process only); None (default) trains on every group.

    After each step the module publishes the per-domain statistics of every generated group as
    ``last_domain_stats``; :class:`qoq.callbacks.DomainStatsFeedback` hands them to the data module.
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
        self.sampling = sampling or SamplingParams()
        check_settings(self.sampling, lr, weight_decay, ppo_epochs, mini_batches, micro_batch_size, token_budget,
                       old_logprobs, init_policy_from)  # fmt: skip
        # Checkpoints keep the components' config, never pickled objects (they load with weights_only=True):
        # built by LightningCLI (hparams then carry `_class_path`), the parsed config is saved whole;
        # built in Python, the component objects are left out and the dataclasses are stored as dicts.
        objects = ["policy", "advantage", "reward", "rollout", "sampling", "eval_sampling", "loss", "dynamic_sampling"]
        self.save_hyperparameters(ignore=objects)
        if "_class_path" in self.hparams:
            self.save_hyperparameters()
        self.automatic_optimization = False
        self.policy = policy
        self.advantage = advantage if advantage is not None else DRPO()
        self.reward = reward if reward is not None else RewardFn()
        self.rollout = rollout if rollout is not None else HFEngine()
        self.eval_sampling = eval_sampling or SamplingParams(n=1, temperature=0.0, max_new_tokens=self.sampling.max_new_tokens)
        self.loss_cfg = loss or LossConfig()
        self.dynamic_sampling = dynamic_sampling
        for name in ("sampling", "eval_sampling", "loss_cfg", "dynamic_sampling"):
            key, value = name.removesuffix("_cfg"), getattr(self, name)
            if value is not None and not isinstance(self.hparams.get(key), dict):
                self.hparams[key] = asdict(value)
        self.ppo_epochs, self.mini_batches = ppo_epochs, mini_batches
        self.micro_batch_size, self.token_budget, self.old_logprobs = micro_batch_size, token_budget, old_logprobs
        self.domain_key, self.trace_every, self.engine_dir = domain_key, trace_every, engine_dir
        self.init_policy_from = init_policy_from
        self.reference: Policy | None = None
        self.domain_names: dict[int, str] = {}  # DRPO domain id -> key, for logging; saved in checkpoints
        self.last_rollout_trace: list[dict[str, Any]] | None = None
        self.last_domain_stats: dict[str, dict[str, float]] | None = None  # read by DomainStatsFeedback
        self._step_keys: set[str] = set()  # every per-step metric name logged so far
        self._configured = self._engine_ready = False
        self._resume_rng: dict[str, Tensor] | None = None  # RNG state of a loaded checkpoint, set before the next step

    # ------------------------------------------------------------------ construction and life cycle
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
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if not params:
            raise ValueError("PolicyOptimization: the policy has no trainable parameters (check `freeze`)")
        hp = self.hparams
        groups = decay_groups(params, hp.weight_decay)
        if hp.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(groups, lr=hp.lr, betas=tuple(hp.betas))
        return torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))

    def configure_callbacks(self) -> list[L.Callback]:
        """The domain-statistics feedback to the data module and, unless the trainer has one, the
        :class:`~qoq.callbacks.predictions.PredictionWriter` of ``qoq predict``."""
        from qoq.callbacks.feedback import DomainStatsFeedback
        from qoq.callbacks.predictions import PredictionWriter

        writers = [cb for cb in self.trainer.callbacks if isinstance(cb, PredictionWriter)]
        return [DomainStatsFeedback()] + ([] if writers else [PredictionWriter()])

    def _ensure_engine(self) -> None:
        if self._engine_ready:
            return
        workdir = Path(self.engine_dir or Path(self.trainer.default_root_dir) / "engine")
        if self.trainer.world_size > 1:  # one engine per rank, each with its own copy of the LM
            workdir = workdir / f"rank{self.trainer.global_rank}"
        with strategies.full_parameters(self.trainer.model):  # sharded weights: gathered for the engine
            self.rollout.setup(self.policy.lm, self.policy.tokenizer, workdir, suppress_token_ids=self.policy.suppress_token_ids,
                               eos_token_ids=self.policy.eos_token_ids)  # fmt: skip
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

    # ------------------------------------------------------------------ the RL step
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
        """The step's rollouts and rewards: of its batch or, with dynamic sampling, of the informative
        groups of up to ``max_gen_batches`` generations (extra prompts from the data module)."""

        def generate(prompts: PromptBatch, k: int) -> tuple[list[Tensor], RolloutBatch, RewardOutput]:
            params = self.sampling
            if params.seed is not None:  # a distinct seed per step and per generation of the step
                params = replace(params, seed=params.seed + self.global_step + 1_000_003 * k)
            with clock("rollout"):
                with torch.no_grad():
                    embeds = self.policy.prompt_embeds(prompts)  # P x [L_i, H]
                rollout = self.rollout.generate([e.detach() for e in embeds], params)
                rollout = replace(rollout, **{k: v.to(self.device) for k, v in vars(rollout).items() if isinstance(v, Tensor)})
            with clock("reward"):
                scored = self.reward(rollout.texts, [prompts.targets[i] for i in rollout.prompt_index.tolist()])
            return embeds, rollout, scored

        if self.dynamic_sampling is None:
            got = collect_plain(batch, generate)
        else:
            source = getattr(self.trainer.datamodule, "extra_batch", None)
            if source is None:
                raise ValueError("dynamic_sampling draws more prompts from the data module's extra_batch(stream_index, "
                                 "draw); fit with a qoq data module (e.g. qoq.data.MultiDomainDataModule)")  # fmt: skip
            pad_id = self.policy.tokenizer.pad_token_id
            draw = lambda k: source(batch.stream_index, k).to(self.device)  # noqa: E731
            got = collect_dynamic(batch, generate, draw, self.dynamic_sampling, 0 if pad_id is None else int(pad_id))
        ids = domain_ids(got.batch, self.domain_key, self.domain_names).to(self.device)[got.rollout.prompt_index]
        exp = Experience(got.batch, got.rollout, got.scored, got.embeds, ids, got)
        if exp.rollout.engine_logprobs is not None:
            self._check(exp, exp.rollout.engine_logprobs, "rollout (engine log-probs)")
        self._check(exp, exp.rewards, "reward")
        return exp

    def _logprobs(self, exp: Experience) -> None:
        """Reference log-probs (KL term, damping) and the old log-probs known before the update."""
        r, temperature = exp.rollout, self._temperature
        if self._needs_reference:
            model = self.reference if self.reference is not None else self.policy
            with self.policy.reference_mode() if self.reference is None else contextlib.nullcontext():
                ref_embeds = model.prompt_embeds(exp.batch)
                exp.ref_logp = model.response_logprobs(ref_embeds, r.response_ids, r.response_mask, r.prompt_index,
                                                       temperature=temperature)[0]  # fmt: skip
            self._check(exp, exp.ref_logp, "reference log-probs")

        def forward(rows: Tensor) -> Tensor:
            return self.policy.response_logprobs(exp.embeds, r.response_ids[rows], r.response_mask[rows],
                                                 r.prompt_index[rows], temperature=temperature)[0]  # fmt: skip

        damping = exp.ref_logp is not None and self.advantage.needs_kl
        exact = update.engine_logprobs_are_exact(r, self.sampling)
        exp.old = update.old_logprobs(forward, r, self._plan(exp), self.old_logprobs, damping, exact)
        self._check(exp, exp.old.logp, "old log-probs")
        if self.loss_cfg.mismatch is not None and r.engine_logprobs is None:
            raise ValueError(f"loss.mismatch={self.loss_cfg.mismatch!r} needs the rollout engine's log-probs, and "
                             f"{type(self.rollout).__name__} reported none")  # fmt: skip
        if exp.old.behaviour is not None:
            exp.kl = losses.response_kl(exp.old.behaviour, exp.ref_logp, r.response_mask, "k3")  # [N]

    def _advantages(self, exp: Experience) -> None:
        """Advantages over the global batch: under data parallelism every rank sees every rank's responses."""
        n = exp.rewards.shape[0]
        kl = exp.kl if exp.kl is not None else torch.zeros_like(exp.rewards)
        comps = {f"component/{k}": v.to(self.device, torch.float32) for k, v in exp.scored.components.items()}
        groups, v = self._gather(exp.rollout.prompt_index, {"rewards": exp.rewards, "domains": exp.domain_ids, "kl": kl, **comps})
        out = self.advantage(AdvantageInputs(
            v["rewards"], groups, v["domains"], v["kl"] if exp.kl is not None else None,
            {k.removeprefix("component/"): x for k, x in v.items() if k.startswith("component/")}, dict(self.reward.weights),
        ))  # fmt: skip
        rank = self.trainer.global_rank if self.trainer.world_size > 1 else 0
        exp.advantages = out.advantages[rank * n : (rank + 1) * n].to(self.device)  # [N]
        exp.advantage_metrics = out.metrics
        self._check(exp, exp.advantages, "advantage")

    def _update(self, exp: Experience) -> dict[str, Tensor]:
        """The PPO loop (:func:`qoq.systems.update.ppo_update`) with this trainer's optimizer and backward."""
        settings = update.UpdateSettings(self.loss_cfg, self.ppo_epochs, self.mini_batches, self.micro_batch_size,
                                         self.token_budget, self.hparams.grad_clip, self._temperature)  # fmt: skip
        hooks = update.UpdateHooks(
            optimizer=self.optimizers(),
            # through the sharded root (FSDP1 hooks see the forward); a plain call otherwise
            grad_logprobs=lambda rows: strategies.root_call(self, "_grad_logprobs", exp.batch, exp.rollout, rows),
            backward=self.manual_backward,
            clip_grad=lambda max_norm: strategies.clip_grad_norm(
                self.trainer.model, [p for p in self.policy.parameters() if p.requires_grad], max_norm),
            step=self.global_step,
        )
        return update.ppo_update(exp.batch, exp.rollout, exp.old, exp.ref_logp, exp.advantages, self._plan(exp),
                                 settings, hooks, [len(e) for e in exp.embeds])  # fmt: skip

    def _gather(self, group_ids: Tensor, values: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Every rank's ``[N]`` values, flattened rank by rank; group ids offset by rank (disjoint groups)."""
        if self.trainer.world_size <= 1:
            return group_ids, values
        gathered = self.all_gather({"g": group_ids, **values})
        groups = gathered.pop("g")  # [W, N]
        offsets = torch.arange(groups.shape[0], device=self.device)[:, None] * (int(groups.max()) + 1)
        return (groups + offsets).flatten(), {k: v.flatten() for k, v in gathered.items()}

    def _grad_logprobs(self, batch: PromptBatch, rollout: RolloutBatch, micro: Tensor) -> tuple[Tensor, Tensor | None]:
        """Current-policy log-probs (and entropy) of the ``micro`` rows, with gradients; only the prompts
        these rows answer are embedded, each once."""
        index = rollout.prompt_index[micro]  # [n_micro]
        used = torch.unique(index)  # [U] sorted
        if len(used) == len(batch):
            embeds = self.policy.prompt_embeds(batch)
        else:
            embeds = self.policy.prompt_embeds(batch.select(used.tolist()))
            index = torch.searchsorted(used, index)  # prompt positions in the sub-batch
        return self.policy.response_logprobs(embeds, rollout.response_ids[micro], rollout.response_mask[micro], index,
                                             temperature=self._temperature, with_entropy=self.loss_cfg.entropy_coef > 0)  # fmt: skip

    def _micro_batches(self, rows: Tensor, rollout: RolloutBatch, prompt_lengths: list[int] | None) -> list[Tensor]:
        """:func:`qoq.systems.update.micro_batches` with this system's settings."""
        return update.micro_batches(rows, rollout.prompt_index, rollout.response_ids.shape[1], prompt_lengths,
                                    self.micro_batch_size, self.token_budget)  # fmt: skip

    def _plan(self, exp: Experience) -> list[list[Tensor]]:
        return update.mini_batch_plan(exp.rollout.prompt_index, len(exp.batch), self.ppo_epochs, self.mini_batches,
                                      self.global_step)  # fmt: skip

    def _check(self, exp: Experience, values: Tensor, phase: str) -> None:
        check_finite(exp.batch, exp.rollout, values, None, phase, self.global_step)

    @property
    def _needs_reference(self) -> bool:
        return self.loss_cfg.kl_coef > 0 or self.advantage.needs_kl

    @property
    def _temperature(self) -> float:
        return self.sampling.temperature if self.sampling.temperature > 0 else 1.0

    # ------------------------------------------------------------------ logging
    def _log_step(self, exp: Experience, metrics: dict[str, Tensor], sync_seconds: float, timers: dict[str, float]) -> None:
        from qoq.data.domains import DOMAINS

        gen = exp.generated
        groups, values = self._gather(gen.generated_groups.to(self.device), {
            "r": gen.generated_rewards.to(self.device, torch.float32), "d": gen.generated_domains.to(self.device)})  # fmt: skip
        tol = self.dynamic_sampling.tol if self.dynamic_sampling is not None else 1e-8
        names = {domain_id(d): d for d in DOMAINS}
        self.last_domain_stats = step_metrics.domain_stats(values["r"], groups, values["d"], names, tol)
        extra = {f"train/{k}": v for k, v in gen.metrics.items()}
        extra.update({f"train/zero_var_frac/{d}": s["zero_var_frac"] for d, s in self.last_domain_stats.items()})
        logs = step_metrics.step_logs(exp, metrics, sync_seconds, timers, self.domain_names, extra)
        # Per-domain keys are absent on steps without that domain: log NaN there, or Lightning's result
        # collection would repeat the domain's last value.
        self._step_keys.update(logs)
        logs.update({k: float("nan") for k in self._step_keys - logs.keys()})
        self.log_dict({k: float(v) for k, v in logs.items()}, on_step=True, batch_size=len(exp.batch))
        self.log("reward", exp.rewards.mean(), prog_bar=True, on_step=True, logger=False, batch_size=len(exp.batch))
        traced = self.trace_every and self.global_step % self.trace_every == 0
        self.last_rollout_trace = step_metrics.trace_rows(exp, self.global_step) if traced else None

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
        index = rollout.prompt_index.tolist()
        return [prediction_row(batch, i, text, self.reward.synonyms) for text, i in zip(rollout.texts, index, strict=True)]

    def _generate_eval(self, batch: PromptBatch) -> RolloutBatch:
        with torch.no_grad():
            embeds = self.policy.prompt_embeds(batch)
            return self.rollout.generate([e.detach() for e in embeds], self.eval_sampling)

    def _evaluate(self, batch: PromptBatch, split: str) -> dict[str, Any]:
        rollout = self._generate_eval(batch)
        scored = self.reward(rollout.texts, [batch.targets[i] for i in rollout.prompt_index.tolist()])
        self.log(f"{split}/reward", scored.total.float().mean(), batch_size=len(batch), sync_dist=True)
        return {"eval_records": eval_records(batch, rollout, scored, self.reward.synonyms)}

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["qoq"] = {"advantage": self.advantage.state_dict(), "domain_names": dict(self.domain_names),
                             "rng": strategies.rng_state()}  # fmt: skip  (rng: exact resume; sampling is seeded per step)
        checkpoint["tokenizer_fingerprint"] = self.policy.tokenizer_fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        source = getattr(self._trainer, "ckpt_path", None) or "checkpoint"
        self.policy.check_tokenizer(checkpoint.get("tokenizer_fingerprint"), source)
        state = checkpoint.get("qoq", {})
        if "advantage" in state:
            self.advantage.load_state_dict(state["advantage"])
        self.domain_names = dict(state.get("domain_names", {}))
        self._resume_rng = state.get("rng")  # applied before the next step: the resumed data iterator draws from it
        self._engine_ready = False  # weights changed: the engine must be re-synced


__all__ = ["LossConfig", "NonFiniteError", "PolicyOptimization", "load_policy_weights"]
