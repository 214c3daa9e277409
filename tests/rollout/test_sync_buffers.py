"""What of the LM reaches a rollout engine besides its parameters: buffers.

A weight push carries the LM's state dict (parameters and persistent buffers); the engine builds every
non-persistent buffer (the rotary ``inv_freq`` tables) itself, from the saved config, in fp32. So the
trainer's non-persistent buffers must equal the config's, in fp32: a bf16 copy (e.g. FSDP mixed precision
casting buffers) moves the trainer's log-probs away from the engine's.
"""

from __future__ import annotations

import torch
from rollout_helpers import tiny_lm

from qoq.models.policy import tiny_policy
from qoq.strategies import PolicyFSDPStrategy


def test_persistent_buffers_are_pushed_and_the_others_come_from_the_config() -> None:
    policy = tiny_policy()
    policy.configure_model()
    lm = policy.base_model
    assert {name for name, _ in policy.lm_weights_for_sync()} == set(lm.state_dict())
    persistent = set(lm.state_dict())
    rebuilt = dict(type(lm)(lm.config).named_buffers())  # what the engine derives from the config
    others = [(name, buf) for name, buf in lm.named_buffers() if name not in persistent]
    assert others, "expected the rotary tables"
    for name, buf in others:
        assert buf.dtype == torch.float32, name
        torch.testing.assert_close(buf, rebuilt[name], rtol=0, atol=0, msg=name)


def test_bf16_rotary_buffers_would_move_the_trainer_off_the_engine() -> None:
    """Rounding ``inv_freq`` to bf16 changes log-probs by far more than the engines' agreement (1e-4), so
    FSDP mixed precision keeps buffers in fp32."""
    model, _ = tiny_lm()
    generator = torch.Generator().manual_seed(0)
    scale = model.get_input_embeddings().weight.std().item()
    inputs = torch.randn(1, 200, 64, generator=generator) * scale
    with torch.no_grad():
        exact = model(inputs_embeds=inputs).logits.log_softmax(-1)
        rotary = model.model.rotary_emb
        saved = rotary.inv_freq.clone()
        rotary.inv_freq.copy_(saved.bfloat16().float())
        try:
            rounded = model(inputs_embeds=inputs).logits.log_softmax(-1)
        finally:
            rotary.inv_freq.copy_(saved)
    gap = (exact - rounded).abs().max().item()
    print(f"log-prob change from bf16 rotary tables: {gap:.2e}")
    assert gap > 1e-3
    mp = PolicyFSDPStrategy(mixed_precision="bf16").mixed_precision_config
    assert mp.buffer_dtype == torch.float32
