"""Sharded data parallelism on CPU: the FSDP code path (wrapping, gathered weight sync, global grad-norm
clipping, full checkpoints) without a GPU, through the real CLI.

The two-process run is launched with ``torchrun`` (``python -m torch.distributed.run``), the launch a
multi-node job uses too; each rank rolls out its own prompts and all ranks must compute the same
advantages over the all-gathered batch and keep the same DRPO statistics.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scale_helpers import ROOT, base_args, load_ckpt, state_digest, write_signal
from torch import nn

from qoq.models import Policy
from qoq.strategies import CPUFSDPStrategy, PolicyFSDPStrategy, clip_grad_norm, layer_classes

HERE = Path(__file__).resolve().parent

#: Callbacks of the multi-process runs: a full checkpoint and the per-rank dump.
_CALLBACKS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_last: true, save_top_k: 0}
    - class_path: scale_helpers.RankDump
model:
  init_args:
    trace_every: 0
"""


def test_layer_classes_finds_decoder_layers_and_encoder_blocks():
    from timm.models.vision_transformer import Block
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    policy = Policy.tiny().build()
    assert layer_classes(policy) == {Qwen2DecoderLayer, Block, nn.TransformerEncoderLayer}
    with pytest.raises(ValueError, match="no layer class to shard"):
        layer_classes(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="cannot be imported"):
        layer_classes(policy, extra=["qoq.models.NoSuchLayer"])


def test_strategy_options_are_checked():
    with pytest.raises(ValueError, match="mixed_precision"):
        PolicyFSDPStrategy(mixed_precision="int8")
    strategy = PolicyFSDPStrategy(mixed_precision="bf16", activation_checkpointing=True)
    mp = strategy.mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (
        torch.bfloat16,
        torch.float32,
        torch.float32,  # the rotary tables: the engine's are fp32 (tests/rollout/test_sync_buffers.py)
    )


def test_clip_grad_norm_without_sharding_is_torchs():
    layer = nn.Linear(3, 2)
    layer.weight.grad = torch.full_like(layer.weight, 3.0)
    layer.bias.grad = torch.full_like(layer.bias, 4.0)
    total = (6 * 9.0 + 2 * 16.0) ** 0.5
    norm = clip_grad_norm(None, layer.parameters(), 1.0)
    assert norm.item() == pytest.approx(total)
    assert layer.weight.grad[0, 0].item() == pytest.approx(3.0 / total, rel=1e-5)


def test_one_process_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 processes"):
        CPUFSDPStrategy()._setup_model(nn.Linear(2, 2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(run_dir: Path, *extra: str, timeout: int = 900) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "qoq.cli",
        "fit",
        *extra,
        "--trainer.default_root_dir",
        str(run_dir),
    ]
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _dumps(run_dir: Path) -> tuple[list[dict], list[dict]]:
    return tuple(
        [json.loads(line) for line in (run_dir / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    )


def test_two_process_fsdp_drpo_fit_checkpoints_and_exact_resume(tmp_path):
    """In the default suite on purpose (~30-60 s): multi-process FSDP and its sharded resume must not rot
    (a sharded ``last.ckpt`` folder was once refused by ``--ckpt_path last``)."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(_CALLBACKS)
    args = base_args(
        "--config",
        str(write_signal(tmp_path)),
        "--config",
        str(ROOT / "configs/trainer/fsdp_cpu.yaml"),
        "--config",
        str(callbacks),
    )

    # 3 steps uninterrupted, one full checkpoint gathered on rank 0
    full = tmp_path / "full"
    _torchrun(full, *args, "--trainer.max_steps", "3")
    rank0, rank1 = _dumps(full)
    assert [r["step"] for r in rank0] == [1, 2, 3] and rank0[0]["world_size"] == 2
    for a, b in zip(rank0, rank1):
        assert a["advantages"] == b["advantages"], f"ranks computed different advantages at step {a['step']}"
        assert a["state"] == b["state"], f"ranks hold different DRPO statistics after step {a['step']}"
    # the global batch: 2 ranks x 4 prompts x 2 samples, with a learning signal
    assert len(rank0[-1]["advantages"]) == 16 and len(set(rank0[-1]["advantages"])) > 1
    ckpt = load_ckpt(full)  # weights_only=True
    assert ckpt["global_step"] == 3
    assert state_digest(ckpt["qoq"]["advantage"]) == rank0[-1]["state"]
    assert not any("_fsdp_wrapped_module" in k for k in ckpt["state_dict"])

    # 2 steps with a sharded checkpoint (one shard file per rank), then --ckpt_path last to step 3
    part = tmp_path / "part"
    sharded = ("--trainer.strategy.init_args.state_dict_type", "sharded")
    _torchrun(part, *args, *sharded, "--trainer.max_steps", "2")
    assert len(list((part / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 2
    _torchrun(part, *args, *sharded, "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert _dumps(part) == (rank0, rank1), "the resumed run differs from the uninterrupted one"


@pytest.mark.slow
@pytest.mark.vllm
def test_two_process_fsdp_with_vllm_rollouts(tmp_path):
    """One in-process vLLM engine per rank; every step's weights are gathered, pushed and verified."""
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(_CALLBACKS)
    run_dir = tmp_path / "run"
    _torchrun(
        run_dir,
        *base_args(
            "--config",
            str(write_signal(tmp_path)),
            "--config",
            str(ROOT / "configs/trainer/fsdp_cpu.yaml"),
            "--config",
            str(ROOT / "configs/rollout/vllm.yaml"),
            "--config",
            str(callbacks),
        ),
        "--trainer.max_steps",
        "2",
    )
    rank0, rank1 = _dumps(run_dir)
    assert rank0 == rank1 and len(rank0) == 2
    assert {p.name for p in (run_dir / "engine").iterdir()} == {"rank0", "rank1"}
    rows = list(csv.DictReader((run_dir / "metrics.csv").read_text().splitlines()))
    assert all(float(r["train/sync_ms"]) > 0 for r in rows if r.get("train/sync_ms"))


@pytest.mark.parametrize("qwen_vl", [False, True], ids=["policy", "qwen_vl"])
def test_every_encoder_runs_on_every_rank_in_one_process(monkeypatch, qwen_vl):
    """The path that keeps sharded ranks in step, in one process: with data parallelism on, a text-only
    batch runs every encoder (on dummies) and gives each a zero gradient; the embeddings are unchanged."""
    from qoq.models import prompts
    from qoq.models.policy import tiny_policy
    from qoq.models.qwen_vl import tiny_qwen_vl_policy
    from scale_helpers import text_batch

    policy = tiny_qwen_vl_policy() if qwen_vl else tiny_policy()
    policy.configure_model()
    batch = text_batch(["no finding", "a longer prompt here"], ["ecg", "ecg"])
    with torch.no_grad():
        alone = policy.prompt_embeds(batch)
    ran: list[str] = []
    for kind, encoder in policy.encoders.items():
        encoder.register_forward_hook(lambda module, args, out, kind=kind: ran.append(kind))
    monkeypatch.setattr(prompts, "data_parallel", lambda: True)
    embeds = policy.prompt_embeds(batch)
    for a, b in zip(alone, embeds):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ran == [encoder for _, encoder, _ in policy._encoder_paths()]  # every path, in its fixed order
    sum(e.sum() for e in embeds).backward()
    for name, param in policy.encoders.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and not param.grad.any(), name


@pytest.mark.slow
@pytest.mark.parametrize("qwen_vl", [False, True], ids=["policy", "qwen_vl"])
def test_two_process_fsdp_with_different_modalities_per_rank(tmp_path, qwen_vl):
    """Rank 0 has an image prompt while rank 1 has a text-only one, then rank 0 text-only while rank 1 has
    an ECG-only one: two RL steps under CPU FSDP complete on both ranks (without every encoder running on
    every rank, gloo fails with a collective size mismatch; NCCL would hang). About 1 min each on 2 busy
    cores."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(HERE / "mixed_modality_worker.py"), str(tmp_path), *(["qwen_vl"] if qwen_vl else [])]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    done = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [d["steps"] for d in done] == [2, 2]
    assert done[0]["kinds"] == [["image"], []] and done[1]["kinds"] == [[], ["ecg"]]
