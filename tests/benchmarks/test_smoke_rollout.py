"""Smoke run of the rollout benchmark: both engines sample, the weight sync is timed and verified."""

from __future__ import annotations

import pytest
import torch

from benchmarks import rollout


@pytest.fixture
def one_thread():
    """One intra-op thread while the smoke run is in this process (quick on a busy machine), then restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rollout_smoke(one_thread):
    results = rollout.run(smoke=True)
    (size,) = results["sizes"]
    assert "error" not in size, size.get("error")
    s = rollout.SMOKE
    for engines in size["groups"].values():
        for engine in ("hf", "vllm"):
            assert engines[engine]["tokens"] == s.prompts * s.groups[0] * s.max_new_tokens
            assert engines[engine]["tokens_per_s"] > 0
    assert size["sync_verified"] and size["sync_s"] > 0 and size["sync_mb"] > 0
    assert 0 < size["step"]["sync_share"] < 1
    text = rollout.render(results)
    assert "| 0.1M |" in text and "sync share of step" in text
