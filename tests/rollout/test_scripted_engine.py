"""The scripted rollout engine: the protocol's output shape, its script order, EOS / truncation, sync counts."""

from __future__ import annotations

import torch

from qoq.rl.rollout import ScriptedEngine
from qoq.types import SamplingParams


def test_texts_in_order_grouped_by_prompt_with_eos_and_cycling() -> None:
    engine = ScriptedEngine(["ab", "c", "def"], logprob=-0.5)
    out = engine.generate([torch.zeros(2, 4)] * 2, SamplingParams(n=2, max_new_tokens=8))
    assert out.prompt_index.tolist() == [0, 0, 1, 1]
    assert out.texts == ["ab", "c", "def", "ab"]  # cycled
    assert out.response_ids[0].tolist() == [ord("a"), ord("b"), 1, 0]  # EOS 1, pad 0
    assert out.response_mask.sum(-1).tolist() == [3, 2, 4, 3] and not out.truncated.any()
    assert torch.equal(out.engine_logprobs[out.response_mask], torch.full((12,), -0.5))
    assert len(engine.calls) == 1


def test_max_new_tokens_truncates_and_syncs_are_counted() -> None:
    engine = ScriptedEngine(["abcdef"])
    out = engine.generate([torch.zeros(1, 4)], SamplingParams(n=2, max_new_tokens=3))
    assert out.texts == ["abc", "abc"] and out.truncated.tolist() == [True, True]
    assert out.engine_logprobs is None
    report = engine.sync_weights([("w", torch.zeros(2, 3)), ("b", torch.zeros(3))])
    assert engine.syncs == 1 and engine.synced_tensors == 2
    assert report.num_tensors == 2 and report.num_bytes == 36 and report.verified
