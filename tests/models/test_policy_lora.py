"""Policy with LoRA (only adapters train, reference = base, merged weight sync) and 8/4-bit quantization."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from qoq.models import Policy, TinyLM
from qoq.testing import TINY_LM, tiny_text_policy

LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture
def lora_policy():
    pol = tiny_text_policy(lora=LORA, system_prompt=None).build()
    with torch.no_grad():  # peft starts with B = 0 (a no-op adapter): make the adapters matter
        for name, p in pol.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return pol


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_only_adapters_are_trainable(lora_policy):
    trainable = [n for n, p in lora_policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 3 * 2  # (A, B) x 3 target modules x 2 layers


def test_reference_mode_is_the_base_model(lora_policy):
    base, _ = TinyLM(**TINY_LM).build()
    ids = torch.randint(3, 500, (2, 9))
    assert not torch.allclose(_logits(lora_policy.lm, ids), _logits(base, ids), atol=1e-3)
    with lora_policy.reference_mode():
        torch.testing.assert_close(_logits(lora_policy.lm, ids), _logits(base, ids))
    assert not torch.allclose(_logits(lora_policy.lm, ids), _logits(base, ids), atol=1e-3)  # adapters back on


def test_lm_weights_for_sync_are_merged_and_leave_the_model_unmerged(lora_policy):
    ids = torch.randint(3, 500, (1, 7))
    logits = _logits(lora_policy.lm, ids)
    merged = copy.deepcopy(lora_policy.lm).merge_and_unload().state_dict()
    synced = dict(lora_policy.lm_weights_for_sync())
    assert set(synced) == set(merged) and "lm_head.weight" in synced
    assert not any("lora" in k or "base_layer" in k for k in synced)
    for name, tensor in merged.items():
        torch.testing.assert_close(synced[name], tensor, msg=name)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(
        synced[q], lora_policy.base_model.get_parameter("model.layers.0.self_attn.q_proj.base_layer.weight")
    )
    assert not any(getattr(m, "merged", False) for m in lora_policy.lm.modules())
    torch.testing.assert_close(_logits(lora_policy.lm, ids), logits)


def test_save_lm_writes_the_merged_model(lora_policy, tmp_path):
    ids = torch.randint(3, 500, (1, 7))
    loaded = AutoModelForCausalLM.from_pretrained(lora_policy.save_lm(tmp_path), local_files_only=True)
    torch.testing.assert_close(_logits(loaded, ids), _logits(lora_policy.lm, ids))


@pytest.mark.parametrize(("bits", "layer"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_lm_builds_and_runs_on_cpu(bits, layer):
    pol = tiny_text_policy(quantization=bits, lora=dict(r=4, target_modules=["q_proj", "v_proj"])).build()
    attn = pol.base_model.model.layers[0].self_attn
    assert type(attn.k_proj).__name__ == layer and type(attn.q_proj.base_layer).__name__ == layer
    prompt = pol.embed_ids(torch.randint(3, 500, (2, 6)))
    response = torch.randint(3, 500, (2, 4))
    logp, _ = pol.response_logprobs(
        [prompt[0], prompt[1]], response, torch.ones(2, 4, dtype=torch.bool), torch.tensor([0, 1])
    )
    assert torch.isfinite(logp).all() and (logp < 0).all()
    logp.sum().backward()
    trainable = [n for n, p in pol.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None for p in pol.parameters() if p.requires_grad)
    synced = dict(pol.lm_weights_for_sync())  # dequantized base weights with the adapters merged
    assert any(name.endswith("self_attn.k_proj.weight") for name in synced)
    assert all(not t.is_floating_point() or t.dtype == torch.float32 for t in synced.values())


def test_shared_prompt_logprobs_equal_the_per_row_path_with_lora(lora_policy):
    pol = lora_policy.train()
    gen = torch.Generator().manual_seed(0)
    embeds = [torch.randn(n, pol.hidden_size, generator=gen) for n in (6, 2, 9)]
    index = torch.tensor([2, 0, 2, 1, 0])
    response_ids = torch.randint(0, 400, (5, 4), generator=gen)
    mask = torch.ones_like(response_ids, dtype=torch.bool)
    mask[3, 2:] = False
    out = []
    for share in (True, False):
        pol.zero_grad(set_to_none=True)
        logp, _ = pol.response_logprobs(embeds, response_ids, mask, index, share_prompts=share)
        logp.sum().backward()
        with torch.no_grad(), pol.reference_mode():
            ref, _ = pol.response_logprobs(embeds, response_ids, mask, index, share_prompts=share)
        out.append((logp.detach(), ref, {n: p.grad.clone() for n, p in pol.named_parameters() if p.grad is not None}))
    (logp_s, ref_s, grads_s), (logp_r, ref_r, grads_r) = out
    torch.testing.assert_close(logp_s, logp_r, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_s, ref_r, rtol=0, atol=1e-5)
    assert not torch.allclose(ref_s, logp_s)  # the adapters matter
    assert grads_s.keys() == grads_r.keys() and all("lora_" in k for k in grads_s)
    for name in grads_r:
        torch.testing.assert_close(grads_s[name], grads_r[name], rtol=1e-4, atol=1e-5, msg=name)
