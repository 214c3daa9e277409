"""PolicyOptimization on the real demo data with the tiny policy: what one RL step changes, and what not."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from qoq.data import MultiDomainDataModule
from qoq.models.policy import tiny_policy
from qoq.rl.advantages import DRPO, GRPO
from qoq.rl.rollout import HFEngine
from qoq.systems import LossConfig, PolicyOptimization
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
        lr=1e-2,
        engine_dir=str(tmp_path / "engine"),
    )
    return PolicyOptimization(**{**defaults, **kwargs})


def _trainer(tmp_path, steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )


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
    a = system.advantage(rewards, groups, domains, kl=kl).advantages
    b = restored.advantage(rewards, groups, domains, kl=kl).advantages
    torch.testing.assert_close(a, b)
