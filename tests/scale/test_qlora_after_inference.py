"""QLoRA after an inference forward: training, weight sync and checkpoints see the trainable 4-bit layout.

On a CPU with avx512_bf16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place into an
inference-only layout on its first eval-mode forward without gradients; rollouts and sync probes make
exactly such forwards. Each test here runs one first. On other CPUs the repack never happens, so the tests
check the same contract there without exercising the bitsandbytes path they guard.
"""

from __future__ import annotations

import io

import bitsandbytes as bnb
import pytest
import torch
from scale_helpers import vllm_greedy_after_sync
from test_lora import LORA, _randomise_adapters

from qoq.models import Policy
from qoq.models.weights import dequantized_weights
from qoq.rl.rollout import HFEngine
from qoq.testing import tiny_text_policy
from qoq.types import SamplingParams

IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))


def _qlora_policy(seed: int = 0) -> Policy:
    torch.manual_seed(seed)
    policy = tiny_text_policy(lora=LORA, quantization="4bit", system_prompt=None).build()
    _randomise_adapters(policy)
    return policy


def _inference_forward(policy: Policy) -> None:
    """What a rollout or a sync probe does: eval mode, no gradients."""
    policy.eval()
    with torch.no_grad():
        policy.lm(IDS)
    policy.train()


def _grads(policy: Policy) -> dict[str, torch.Tensor]:
    policy.lm(IDS).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_every_4bit_layer_keeps_its_trainable_layout():
    policy = _qlora_policy()
    _inference_forward(policy)
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    assert not any(m.support_avx512bf16_for_cpu for m in layers), "the CPU inference repack is enabled"
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


def test_gradients_after_an_inference_forward_are_those_of_a_fresh_policy():
    """(a) Training after a rollout: every adapter gets the gradient it gets without the rollout (before
    the fix, layers with a bias raised and layers without one dropped the gradient to their input)."""
    fresh, used = _qlora_policy(), _qlora_policy()
    _inference_forward(used)
    want, got = _grads(fresh), _grads(used)
    assert want.keys() == got.keys() and any(".lora_A." in n for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
        assert got[name].abs().sum() > 0, f"{name} got no gradient"


def test_checkpoint_after_an_inference_forward_reloads_the_same_base_weights():
    """(c) A checkpoint written after a rollout holds the frozen 4-bit base exactly as quantized, and loads
    back strictly (the quantization state saved beside each 4-bit weight is read back too)."""
    policy = _qlora_policy()
    want = dequantized_weights(policy.lm)
    _inference_forward(policy)
    buffer = io.BytesIO()
    torch.save(policy.state_dict(), buffer)
    buffer.seek(0)
    reloaded = _qlora_policy(seed=1)  # other random weights, overwritten by the checkpoint
    reloaded.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    got = dequantized_weights(reloaded.lm)
    assert want.keys() == got.keys() and want
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)


def test_dequantizing_a_repacked_weight_is_refused():
    """A layer repacked behind the policy's back is an error naming it, never garbage for the engine."""
    policy = _qlora_policy()
    layer = next(m for m in policy.lm.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer.weight.quant_state.packing_format_for_cpu = True  # what the repack leaves (its flag)
    with pytest.raises(RuntimeError, match="CPU inference layout"):
        dequantized_weights(policy.lm)


@pytest.mark.vllm
def test_vllm_greedy_output_matches_the_trainer_after_an_inference_forward(tmp_path):
    """(b) Rollouts first (HF greedy, an eval forward), then the merged dequantized sync: vLLM's greedy
    tokens equal the trainer's."""
    policy = _qlora_policy()
    prompts = [policy.embed_ids(torch.randint(3, 400, (n,))).detach() for n in (6, 11, 9)]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    hf = HFEngine()
    hf.setup(policy.lm, policy.tokenizer, tmp_path, eos_token_ids=policy.eos_token_ids)
    want = hf.generate(prompts, greedy)
    got = vllm_greedy_after_sync(policy, prompts, tmp_path / "engine")
    assert got.response_ids.tolist() == want.response_ids.tolist()
    assert hf.generate(prompts, greedy).response_ids.tolist() == want.response_ids.tolist()
