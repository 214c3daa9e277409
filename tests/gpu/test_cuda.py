"""The CUDA paths on one GPU (``make test-gpu``; run by ``scripts/gpu_check.sh``): rollouts and GRPO steps
in bf16 on the device. Skipped without CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import common
from qoq.models.builders import TinyLM
from qoq.rl.rollout import HFEngine
from qoq.types import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1}


def test_hf_engine_samples_on_the_gpu_in_bf16(tmp_path):
    model, tokenizer = TinyLM(**TINY).build()
    model = model.to("cuda", torch.bfloat16).eval()
    embed = model.get_input_embeddings()
    prompts = [
        embed(torch.tensor(tokenizer(text)["input_ids"], device="cuda"))
        for text in ("the patient has", "ecg shows")
    ]
    engine = HFEngine()
    engine.setup(model, tokenizer, tmp_path)
    batch = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=8, temperature=1.0, seed=0))
    assert len(batch) == 6 and batch.response_ids.shape[1] <= 8
    assert batch.engine_logprobs.float().isfinite().all()


def test_grpo_steps_train_on_the_gpu_in_bf16_mixed():
    res = common.fit_grpo(
        TINY,
        common.without_eos(HFEngine()),
        steps=2,
        n=2,
        max_new_tokens=8,
        accelerator="gpu",
        precision="bf16-mixed",
    )
    assert len(res["step_s"]) == 2 and res["eos_disabled"]
    assert all(math.isfinite(t) and t > 0 for t in res["response_tokens"])
