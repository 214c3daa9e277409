"""Worker of the mixed-modality FSDP test, one process per rank (``torchrun --nproc_per_node 2``).

Rank 0 and rank 1 get prompts of different modalities at the same step (an image prompt next to a
text-only one, then a text-only prompt next to an ECG-only one), so they take different encoder paths.
Two RL steps of the real system under :class:`qoq.strategies.CPUFSDPStrategy`; each rank writes
``<out>/rank<r>.json`` when it finishes. Usage: ``mixed_modality_worker.py OUT_DIR [qwen_vl]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from qoq.data import MultiDomainDataModule
from qoq.data.dataset import collate
from qoq.data.domains import DOMAINS
from qoq.models import adamw
from qoq.models.policy import tiny_policy
from qoq.models.qwen_vl import tiny_qwen_vl_policy
from qoq.rl.advantages import GRPO
from qoq.rl.rollout import HFEngine
from qoq.strategies import CPUFSDPStrategy
from qoq.systems import LossConfig, PolicyOptimization
from qoq.testing import quiet_trainer
from qoq.types import SamplingParams


def _samples_by_kinds() -> dict[frozenset[str], object]:
    """One demo sample per set of modality kinds (first found), plus a text-only one."""
    dm = MultiDomainDataModule(demo=True, batch_size=2, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    dataset = dm._dataset(dm.train_records)
    found: dict[frozenset[str], object] = {}
    for i in range(len(dataset)):
        sample = dataset[i]
        found.setdefault(frozenset(sample.items), sample)
    image = found[frozenset({"image"})]
    text = dataclasses.replace(image, text=image.text.replace("<image>", "").strip(), items={})
    found[frozenset()] = text
    return found


def main(out: Path, qwen_vl: bool) -> None:
    rank = int(os.environ["RANK"])
    found = _samples_by_kinds()
    plan = {  # step -> kinds of this rank's one prompt
        0: [frozenset({"image"}), frozenset()],
        1: [frozenset(), frozenset({"ecg"})],
    }
    batches = [collate([found[plan[step][rank]]], DOMAINS) for step in (0, 1)]
    torch.manual_seed(0)
    system = PolicyOptimization(
        policy=tiny_qwen_vl_policy() if qwen_vl else tiny_policy(),
        advantage=GRPO(),
        rollout=HFEngine(),
        sampling=SamplingParams(n=2, max_new_tokens=4, temperature=1.0, seed=0),
        loss=LossConfig(),
        optimizer=adamw(lr=1e-3, weight_decay=0.01),
        trace_every=0,
        engine_dir=str(out / "engine"),
    )
    trainer = quiet_trainer(
        2,
        devices=2,
        strategy=CPUFSDPStrategy(timeout=timedelta(seconds=120)),
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=out,
    )
    trainer.fit(system, DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    kinds = [sorted(plan[step][rank]) for step in (0, 1)]
    (out / f"rank{rank}.json").write_text(json.dumps({"steps": trainer.global_step, "kinds": kinds}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), qwen_vl=sys.argv[2:] == ["qwen_vl"])
