"""LoRA and QLoRA RL: only adapters train, the reference is the base (adapters off, no copy), rollout
engines get merged (and, for QLoRA, dequantized) weights, and the 8-bit AdamW optimizer steps."""

from __future__ import annotations

import functools

import pytest
import torch
from scale_helpers import fit_system, text_batch, vllm_greedy_after_sync
from transformers import Qwen2ForCausalLM

from qoq.models import Policy, TinyLM
from qoq.rl.advantages import DRPO
from qoq.rl.rewards import RewardFn
from qoq.rl.rollout import HFEngine
from qoq.systems import PolicyOptimization
from qoq.systems.policy_optimization import LossConfig
from qoq.testing import TINY_LM, tiny_text_policy
from qoq.types import SamplingParams

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
BATCHES = [
    text_batch(["Is this chest x-ray normal?", "Describe the ECG."], ["chest_xray", "ecg"]),
    text_batch(["Any fracture?", "Is the fundus normal?"], ["ct", "fundus"]),
]


def _system(quantization: str | None, optimizer: str = "adamw") -> PolicyOptimization:
    settings = {"lr": 0.05, "betas": (0.9, 0.999), "weight_decay": 0.01}
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        make_optimizer = functools.partial(bnb.optim.AdamW8bit, **settings)
    else:
        make_optimizer = functools.partial(torch.optim.AdamW, **settings)
    return PolicyOptimization(
        tiny_text_policy(lora=LORA, quantization=quantization, system_prompt=None),
        advantage=DRPO(window=10, kl_damping=True),
        reward=RewardFn(weights={"accuracy": 0.5, "format": 0.1, "length": 0.4}),  # a signal for a random LM
        rollout=HFEngine(),
        sampling=SamplingParams(n=2, max_new_tokens=8, seed=0),
        loss=LossConfig(kl_coef=0.05),
        optimizer=make_optimizer,
    )


def _randomise_adapters(policy: Policy) -> None:
    """peft starts with B = 0 (the adapters are a no-op): make them matter."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)


@pytest.mark.parametrize(
    ("quantization", "optimizer"),
    [(None, "adamw"), ("4bit", "adamw"), (None, "adamw8bit"), ("8bit", "adamw8bit")],
)
def test_rl_steps_change_only_the_adapters(quantization, optimizer):
    system = _system(quantization, optimizer)
    system.configure_model()
    assert system.reference is None, "LoRA needs no frozen copy: the reference is the base model"
    before = {n: p.detach().clone() for n, p in system.named_parameters()}
    before |= {n: b.detach().clone() for n, b in system.named_buffers()}
    trainer = fit_system(system, BATCHES, steps=2)
    changed = {
        n for n, p in [*system.named_parameters(), *system.named_buffers()] if not torch.equal(p, before[n])
    }
    assert changed, "nothing trained"
    assert all(".lora_A." in n or ".lora_B." in n for n in changed), sorted(changed)[:5]
    assert {n for n in changed if ".lora_A." in n}, "lora_A never moved"
    kl = trainer.logged_metrics["train/kl"]
    assert kl > 0, "after an update the policy must differ from its reference (adapters disabled)"
    if optimizer == "adamw8bit":
        import bitsandbytes as bnb

        assert isinstance(system.optimizers().optimizer, bnb.optim.AdamW8bit)


def test_reference_logprobs_come_from_the_base_model():
    system = _system(None)
    system.configure_model()
    _randomise_adapters(system.policy)
    base, _ = TinyLM(**TINY_LM).build()
    ids = torch.randint(3, 400, (2, 7))
    with torch.no_grad(), system.policy.reference_mode():
        torch.testing.assert_close(system.policy.lm(ids).logits, base(ids).logits)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_sync_weights_are_dequantized_and_merged(bits):
    """A dense model built from the pushed weights computes what the QLoRA policy computes."""
    policy = tiny_text_policy(lora=LORA, quantization=bits, system_prompt=None).build()
    _randomise_adapters(policy)
    weights = dict(policy.lm_weights_for_sync())  # before any forward pass
    assert not any("absmax" in n or "quant" in n or n.endswith(".SCB") or "lora_" in n for n in weights)
    config = {k: v for k, v in policy.base_model.config.to_dict().items() if k != "quantization_config"}
    dense = Qwen2ForCausalLM(policy.base_model.config.__class__(**config))
    missing, unexpected = dense.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    ids = torch.randint(3, 400, (2, 9))
    with torch.no_grad():
        got, want = dense(ids).logits, policy.lm(ids).logits
    # the 4/8-bit layers dequantize and multiply in the compute dtype: equal up to summation order
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


@pytest.mark.vllm
@pytest.mark.parametrize("quantization", [None, "4bit"])
def test_vllm_greedy_output_matches_the_trainer_after_a_merged_sync(quantization, tmp_path):
    policy = tiny_text_policy(lora=LORA, quantization=quantization, system_prompt=None).build()
    _randomise_adapters(policy)
    prompts = [policy.embed_ids(torch.randint(3, 400, (n,))).detach() for n in (6, 11, 9)]
    hf = HFEngine()
    hf.setup(policy.lm, policy.tokenizer, tmp_path, eos_token_ids=policy.eos_token_ids)
    got = vllm_greedy_after_sync(policy, prompts, tmp_path / "engine")  # synced before any HF forward
    want = hf.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    assert got.response_ids.tolist() == want.response_ids.tolist()
