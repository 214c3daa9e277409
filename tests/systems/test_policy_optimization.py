"""PolicyOptimization on the real demo data with the tiny policy: what one RL step changes, and what not."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from qoq.data import MultiDomainDataModule
from qoq.models import adamw
from qoq.models.policy import tiny_policy
from qoq.rl.advantages import DRPO, GRPO, AdvantageInputs
from qoq.rl.rewards import RewardFn
from qoq.rl.rollout import HFEngine, ScriptedEngine
from qoq.systems import LossConfig, NonFiniteError, PolicyOptimization
from qoq.testing import GradCapture, fit, quiet_trainer
from qoq.types import SamplingParams


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> MultiDomainDataModule:
    dm = MultiDomainDataModule(demo=True, batch_size=3, val_batch_size=4, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _system(tmp_path, **kwargs) -> PolicyOptimization:
    defaults = dict(
        policy=tiny_policy(freeze=["encoders"]),
        advantage=DRPO(window=5),
        rollout=HFEngine(),
        sampling=SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=0),
        loss=LossConfig(kl_coef=0.01),
        optimizer=adamw(lr=1e-2, weight_decay=0.01),
        engine_dir=str(tmp_path / "engine"),
    )
    return PolicyOptimization(**{**defaults, **kwargs})


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return quiet_trainer(steps, limit_val_batches=0, default_root_dir=tmp_path)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_step_changes_trainable_weights_only(tmp_path, datamodule) -> None:
    system = _system(tmp_path)
    system.configure_model()
    before_policy = _snapshot(system.policy)
    before_reference = _snapshot(system.reference)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(system, datamodule=datamodule)
    after = _snapshot(system.policy)

    changed = {k for k in before_policy if not torch.equal(before_policy[k], after[k])}
    lm_keys = {k for k in before_policy if k.startswith("language_model.")}
    encoder_keys = {k for k in before_policy if k.startswith("encoders.")}
    assert changed & lm_keys, "no LM weight moved after an RL step at lr 1e-2"
    assert not changed & encoder_keys, f"frozen encoder weights changed: {sorted(changed & encoder_keys)[:3]}"
    assert all(torch.equal(v, system.reference.state_dict()[k]) for k, v in before_reference.items()), (
        "the frozen reference policy changed"
    )
    assert trainer.global_step == 1


def test_optimizer_steps_per_rollout_batch(tmp_path, datamodule) -> None:
    """ppo_epochs x mini_batches optimizer steps per training step, each a real AdamW step."""
    system = _system(tmp_path, advantage=GRPO(), ppo_epochs=2, mini_batches=3, loss=LossConfig())
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(system, datamodule=datamodule)
    optimizer = trainer.optimizers[0]
    steps = {int(state["step"]) for state in optimizer.state.values() if "step" in state}
    assert steps == {6}
    assert system.reference is None, "GRPO without a KL term needs no reference policy"


def test_drpo_state_round_trips_through_checkpoint(tmp_path, datamodule) -> None:
    system = _system(tmp_path)
    trainer = _trainer(tmp_path, steps=2)
    trainer.fit(system, datamodule=datamodule)
    path = tmp_path / "state.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    restored = _system(tmp_path)
    restored.on_load_checkpoint(state)
    assert restored.domain_names == system.domain_names
    assert restored.advantage.state_dict().keys() == system.advantage.state_dict().keys()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 1, 1])
    domains = torch.tensor([0, 0, 1, 1])
    kl = torch.zeros(4)
    a = system.advantage(AdvantageInputs(rewards, groups, domains, kl=kl)).advantages
    b = restored.advantage(AdvantageInputs(rewards, groups, domains, kl=kl)).advantages
    torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def one_batch(datamodule):
    """The first training batch, fixed (the data module's stream moves on between fits)."""
    return next(iter(datamodule.train_dataloader()))


def _run(tmp_path, batch, **kwargs):
    """One training step on ``batch`` with a reward that differs per response (length), GRPO, no clipping.

    Returns the system, the gradients at each optimizer step, the logged metrics and the sizes of the
    no-grad policy log-prob forwards.
    """
    defaults = {
        "advantage": GRPO(),
        "reward": RewardFn(weights={"accuracy": 0.5, "length": 0.5}),
        "sampling": SamplingParams(n=2, max_new_tokens=8, temperature=1.0, seed=0),
        "grad_clip": 0.0,
    }
    system = _system(tmp_path, **{**defaults, **kwargs})
    system.configure_model()
    forwards = []
    logprobs = system.policy.response_logprobs

    def counted(*args, **kw):
        if not torch.is_grad_enabled():
            forwards.append(len(args[1]))  # responses in this no-grad forward
        return logprobs(*args, **kw)

    system.policy.response_logprobs = counted
    capture = GradCapture()
    trainer = fit(system, [batch], 1, callbacks=[capture], limit_val_batches=0, default_root_dir=tmp_path)
    return system, capture.grads, dict(trainer.callback_metrics), forwards


def _assert_same_grads(a, b):
    assert len(a) == len(b) and all(g.keys() == h.keys() and g for g, h in zip(a, b))
    for g, h in zip(a, b):
        assert any(v.abs().max() > 0 for v in g.values())
        for name in g:
            torch.testing.assert_close(g[name], h[name], rtol=1e-4, atol=1e-6, msg=name)


def test_on_policy_old_logprobs_reuse_the_gradient_pass(tmp_path, one_batch) -> None:
    """ppo_epochs=1, mini_batches=1: no old-log-prob forward, and the same loss and gradients as with it."""
    _, grads_reuse, logs_reuse, fwd_reuse = _run(tmp_path, one_batch, old_logprobs="reuse")
    _, grads_fwd, logs_fwd, fwd_fwd = _run(tmp_path, one_batch, old_logprobs="forward")
    assert fwd_reuse == [] and fwd_fwd == [6]  # 3 prompts x 2 samples
    _assert_same_grads(grads_reuse, grads_fwd)
    for key in ("train/loss", "train/pg_loss", "train/kl", "train/reward", "train/logp_mismatch_mean"):
        torch.testing.assert_close(logs_reuse[key], logs_fwd[key], rtol=1e-4, atol=1e-6, msg=key)


def test_reused_old_logprobs_across_mini_batches_and_epochs(tmp_path, one_batch) -> None:
    """Later mini-batches get the no-grad forward (first mini-batch's rows excepted); every step matches."""
    kwargs = {"ppo_epochs": 2, "mini_batches": 3}
    system_r, grads_r, _, fwd_r = _run(tmp_path, one_batch, old_logprobs="reuse", **kwargs)
    system_f, grads_f, _, fwd_f = _run(tmp_path, one_batch, old_logprobs="forward", **kwargs)
    assert fwd_r == [4] and fwd_f == [6]  # 3 groups of 2: the first mini-batch (one group) is skipped
    _assert_same_grads(grads_r, grads_f)
    for name, p in system_f.policy.named_parameters():  # after 6 Adam steps: fp32 noise, normalised by Adam
        torch.testing.assert_close(system_r.policy.get_parameter(name), p, rtol=1e-3, atol=2e-5)


def test_drpo_kl_damping_uses_the_engine_logprobs_when_reusing(tmp_path, one_batch) -> None:
    seen = []

    class Recording(DRPO):
        def __call__(self, inputs):
            seen.append(inputs.kl.clone())
            return super().__call__(inputs)

    _, _, _, forwards = _run(tmp_path, one_batch, advantage=Recording(window=5))
    assert forwards == [] and seen[0].shape == (6,) and torch.isfinite(seen[0]).all()
    # a top-p cut makes the engine's log-probs those of a truncated distribution: the forward is kept
    top_p = SamplingParams(n=2, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=0)
    _, _, _, forwards = _run(tmp_path, one_batch, advantage=Recording(window=5), sampling=top_p)
    assert forwards == [6]
    _, _, _, forwards = _run(tmp_path, one_batch, advantage=Recording(window=5), old_logprobs="forward")
    assert forwards == [6]


def test_micro_batches_embed_only_their_prompts_with_trainable_encoders(tmp_path, one_batch) -> None:
    """micro_batch_size=1 embeds each micro-batch's prompt only; the gradient equals one whole pass."""
    kwargs = {"policy": tiny_policy(), "loss": LossConfig(kl_coef=0.0)}
    _, whole, _, _ = _run(tmp_path, one_batch, **kwargs)
    _, split, _, _ = _run(tmp_path, one_batch, micro_batch_size=1, **kwargs | {"policy": tiny_policy()})
    assert any(k.startswith("encoders.") for k in whole[0])
    _assert_same_grads(split, whole)


def test_bad_old_logprobs_is_rejected() -> None:
    with pytest.raises(ValueError, match="old_logprobs"):
        PolicyOptimization(tiny_policy(), old_logprobs="never")


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gspo_matches_token_ratio_on_policy_and_is_micro_batch_invariant(tmp_path, one_batch, level) -> None:
    """On policy (one epoch, one mini-batch) every ratio is 1: GSPO and PPO give the same gradient under
    seq_mean_token_mean; splitting into micro-batches changes nothing."""
    loss = LossConfig(kl_coef=0.0, agg="seq_mean_token_mean", ratio_level=level, eps_low=3e-4, eps_high=4e-4)
    _, whole, logs, _ = _run(tmp_path, one_batch, loss=loss)
    _, split, _, _ = _run(tmp_path, one_batch, loss=loss, micro_batch_size=1)
    _, token, _, _ = _run(tmp_path, one_batch, loss=LossConfig(kl_coef=0.0, agg="seq_mean_token_mean"))
    _assert_same_grads(split, whole)
    _assert_same_grads(token, whole)
    assert float(logs["train/clip_frac"]) == 0.0


def test_mismatch_correction_masks_and_logs(tmp_path, one_batch) -> None:
    """A band that excludes ratio 1 masks every token (no policy gradient, masked fraction 1); the default
    band keeps them all (the HF engine's log-probs are the trainer's up to the renormalisation over
    non-suppressed tokens)."""
    kept = LossConfig(mismatch="icepop", mismatch_low=0.5, mismatch_high=5.0)
    _, grads, logs, _ = _run(tmp_path, one_batch, loss=kept)
    assert float(logs["train/is_masked_frac"]) == 0.0
    assert float(logs["train/is_weight"]) == pytest.approx(1.0, abs=0.05)
    assert any(v.abs().max() > 0 for v in grads[0].values())
    for mode in ("icepop", "seq_mask"):
        dropped = LossConfig(mismatch=mode, mismatch_low=2.0, mismatch_high=5.0)
        _, grads, logs, _ = _run(tmp_path, one_batch, loss=dropped)
        assert float(logs["train/is_masked_frac"]) == 1.0 and float(logs["train/pg_loss"]) == 0.0
        assert all(v.abs().max() == 0 for v in grads[0].values())


@pytest.mark.parametrize("phase", ["update", "engine"])
def test_non_finite_log_probs_raise_before_the_optimizer(tmp_path, one_batch, phase) -> None:
    """A NaN log-prob raises with the step, the phase and the prompt id; no weight moves."""
    system = _system(tmp_path, advantage=GRPO(), loss=LossConfig())
    system.configure_model()
    before = _snapshot(system.policy)
    if phase == "update":
        logprobs = system.policy.response_logprobs

        def poisoned(*args, **kw):
            logp, entropy = logprobs(*args, **kw)
            return logp.clone().index_fill_(0, torch.tensor([1]), float("nan")), entropy

        system.policy.response_logprobs = poisoned
        expected = "phase 'update \\(current log-probs\\)'"
    else:
        generate = system.rollout.generate

        def poisoned(*args, **kw):
            out = generate(*args, **kw)
            out.engine_logprobs[3] = float("-inf")
            return out

        system.rollout.generate = poisoned
        expected = "phase 'rollout \\(engine log-probs\\)'"
    with pytest.raises(NonFiniteError, match=f"step 0, {expected}.*{one_batch.ids[1 if phase == 'engine' else 0]}"):
        fit(system, [one_batch], 1, limit_val_batches=0, default_root_dir=tmp_path)
    after = _snapshot(system.policy)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_single_sample_groups_are_refused_at_construction(tmp_path) -> None:
    """n = 1 leaves nothing to compare with: every group-relative advantage would be 0 and nothing would
    train, so the setting is refused before anything is built (the estimators themselves return zeros)."""
    with pytest.raises(ValueError, match="sampling.n=1: group-relative advantages"):
        _system(tmp_path, sampling=SamplingParams(n=1))


@pytest.mark.parametrize("n", [2])
def test_all_equal_groups_give_zero_finite_advantages(tmp_path, one_batch, n) -> None:
    """A constant reward (every group all-equal): a finite step that moves nothing but the KL term, for
    every estimator."""
    from qoq.rl.advantages import DRPO, RLOO, DrGRPO, ReinforcePPBaseline

    class Constant(RewardFn):
        def __call__(self, texts, targets):
            out = super().__call__(texts, targets)
            out.total = torch.full_like(out.total, 0.5)
            return out

    for advantage in (GRPO(), DrGRPO(), RLOO(), ReinforcePPBaseline(), DRPO(window=5)):
        sampling = SamplingParams(n=n, max_new_tokens=8, temperature=1.0, seed=0)
        _, grads, logs, _ = _run(tmp_path, one_batch, advantage=advantage, sampling=sampling,
                                 reward=Constant(), loss=LossConfig(kl_coef=0.0))
        assert float(logs["train/pg_loss"]) == 0.0, type(advantage).__name__
        assert all(v.abs().max() == 0 for v in grads[0].values()), type(advantage).__name__


def test_scripted_rollouts_are_scored_and_synced_once_per_step(tmp_path, one_batch) -> None:
    """With the scripted engine the step's rewards are those of its texts, and the weights are pushed once
    at the start and once after each step's update."""
    right, wrong = "<think>ok</think>\\boxed{" + one_batch.targets[0].answer[0] + "}", "\\boxed{}"
    engine = ScriptedEngine([right, wrong], logprob=0.0)
    system, _, logs, _ = _run(tmp_path, one_batch, rollout=engine, reward=RewardFn(weights={"accuracy": 1.0}),
                              trace_every=1, sampling=SamplingParams(n=2, max_new_tokens=64, seed=0))
    assert engine.syncs == 2 and engine.synced_tensors > 0 and len(engine.calls) == 1
    assert engine.calls[0].n == 2 and float(logs["train/logp_mismatch_max"]) > 0  # engine says 0, trainer not
    rows = system.last_rollout_trace
    assert [r["response"] for r in rows[:2]] == [right, wrong] and rows[0]["reward"] == 1.0
