"""A saved policy LM runs in vLLM, and fused multimodal prompt embeddings give HF's greedy output."""

import pytest
import torch

from qoq.testing import make_batch

pytestmark = pytest.mark.vllm


def test_saved_lm_greedy_matches_hf_with_prompt_embeds(tmp_path):
    vllm = pytest.importorskip("vllm")
    from qoq.models import Policy

    policy = Policy.tiny(lora=dict(r=4, target_modules=["q_proj", "v_proj"])).build().eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    batch = make_batch(["What does <image> show?"], modalities={"image": (torch.rand(1, 3, 32, 32), [0])})
    with torch.no_grad():
        embeds = policy.prompt_embeds(batch)[0]
        hf = policy.lm.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
            do_sample=False,
            max_new_tokens=12,
            min_new_tokens=12,
        )
    llm = vllm.LLM(
        str(policy.save_lm(tmp_path)),
        enforce_eager=True,
        enable_prompt_embeds=True,
        dtype="float32",
        max_model_len=512,
        seed=0,
    )
    out = llm.generate(
        [{"prompt_embeds": embeds}], vllm.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    )
    assert list(out[0].outputs[0].token_ids) == hf[0, -12:].tolist()
