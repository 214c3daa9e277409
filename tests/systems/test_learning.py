"""Learning sanity: GRPO and DRPO raise held-out accuracy on a tiny task whose answer the input determines.

The task: 32 x 32 images whose label is the colour of every pixel ("ct": red or blue?; and, for DRPO, a rare
"fundus" domain: green or yellow?; colours, not brightness: the encoders' layer norms remove a uniform scale). The warm start is SFT on the same questions with
answers drawn independently of the image, so the policy answers in the format and in the label words, but at
chance; only RL can make the answer depend on the image. Each test trains a few dozen rollout batches and
checks the gain in greedy held-out accuracy against a margin chosen from five seeds (listed at each test).
They fail if learning silently breaks: an advantage sign, a response mask, the group broadcast of the
advantages or the weight sync to the rollout engine.
"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from qoq.data import ClinicalDataModule
from qoq.data.dataset import ClinicalDataset, collate
from qoq.data.domains import DOMAINS
from qoq.data.manifest import read_manifest
from qoq.models import FusionProjector, adamw, Policy, PolicyOptions, TinyLM, VisionEncoder
from qoq.rl.advantages import DRPO, GRPO
from qoq.rl.rewards import RewardFn, set_f1
from qoq.rl.rollout import HFEngine
from qoq.systems import LossConfig, PolicyOptimization
from qoq.testing import quiet_trainer
from qoq.types import SamplingParams

SIZE = 32
SFT_STEPS = 150
MAX_TOKENS = 12
SFT_LR = 3e-3
RL_STEPS = 40
RL_LR = 1e-3
#: domain -> (question, labels, RGB colour of each label's images)
TASKS = {
    "ct": ("Is this image red or blue?", ("red", "blue"), ((190, 40, 40), (40, 40, 190))),
    "fundus": ("Is this image green or yellow?", ("green", "yellow"), ((40, 190, 40), (190, 190, 40))),
}


def _write(root: Path, split: str, counts: dict[str, int], seed: int, random_answers: bool = False) -> Path:
    """A manifest of ``counts[domain]`` records; labels alternate, answers random if ``random_answers``."""
    rng = np.random.default_rng([seed, len(split)])
    rows = []
    for domain, n in counts.items():
        question, labels, colours = TASKS[domain]
        for i in range(n):
            k = i % 2
            pixels = np.clip(np.array(colours[k]) + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(
                np.uint8
            )
            path = root / "files" / f"{domain}-{split}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
            answer = labels[int(rng.integers(2))] if random_answers else labels[k]
            rows.append({"id": f"{domain}:{split}:{i}", "problem": f"<image>\n{question} Options: {', '.join(labels)}.",
                         "answer": answer, "labels": list(labels), "domain": domain, "dataset": f"toy-{domain}",
                         "images": [str(path)], "origin": "synthetic", "label_source": "generator"})  # fmt: skip
    manifest = root / f"{split}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """Warm-start pool (random answers), RL stream (ct 9 : fundus 1) and held-out split (balanced)."""
    root = tmp_path_factory.mktemp("learning")
    return {
        "sft": _write(root, "sft", {"ct": 48, "fundus": 48}, 0, random_answers=True),
        "train": _write(root, "train", {"ct": 90, "fundus": 10}, 1),
        "eval": _write(root, "eval", {"ct": 32, "fundus": 32}, 2),
    }


def _policy() -> Policy:
    corpus = [f"<image>\n{q} Options: {', '.join(labels)}." for q, labels, _ in TASKS.values()]
    corpus += [f"\\boxed{{{x}}}" for _, labels, _ in TASKS.values() for x in labels]
    vit = {"depth": 1, "embed_dim": 32, "num_heads": 1, "patch_size": 8, "mlp_ratio": 2.0}
    return Policy(
        lm=TinyLM(
            hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=1024, extra_corpus=corpus
        ),
        encoders={"image": VisionEncoder(image_size=SIZE, backbone_kwargs=vit)},
        projector=FusionProjector(in_dims={"image": 32}, hidden_size=64, tokens_per_item={"image": 2}),
        options=PolicyOptions(system_prompt=None),
    )


def _trainer(root: Path, steps: int = -1) -> L.Trainer:
    return quiet_trainer(steps, limit_val_batches=0, default_root_dir=root)


def _data(manifest: Path, seed: int, batch_size: int = 8) -> ClinicalDataModule:
    return ClinicalDataModule(manifests=[str(manifest)], val_fraction=0.0, batch_size=batch_size,
                              image_size=SIZE, seed=seed, instruction=None)  # fmt: skip


def _accuracy(system: PolicyOptimization, manifest: Path, root: Path) -> dict[str, float]:
    """Greedy held-out accuracy per domain."""
    records = read_manifest(manifest)
    loader = DataLoader(ClinicalDataset(records, SIZE, instruction=None), batch_size=64,
                        collate_fn=partial(collate, domain_vocab=list(DOMAINS)))  # fmt: skip
    rows = [r for batch in _trainer(root).predict(system, dataloaders=loader) for r in batch]
    hits = [(r["domain"], set_f1(frozenset(r["labels"]), frozenset(r["gold"]))) for r in rows]  # the accuracy reward
    return {d: float(np.mean([h for dom, h in hits if dom == d])) for d in sorted({d for d, _ in hits})}


def _warm_start(policy: Policy, manifest: Path, seed: int) -> None:
    """SFT on short references ``\\boxed{answer}`` of the random-answer pool (format and label words only)."""
    policy.build()
    data = _data(manifest, seed)
    data.setup("fit")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=SFT_LR)
    step = 0
    while step < SFT_STEPS:
        for batch in data.train_dataloader():
            batch = replace(batch, references=[f"\\boxed{{{t.answer[0]}}}" for t in batch.targets])
            loss = policy.sft_loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == SFT_STEPS:
                break


def learning_gain(
    task: dict[str, Path], root: Path, advantage, seed: int, rl_steps: int = RL_STEPS, lr: float = RL_LR
) -> tuple[dict, dict]:
    """Held-out accuracy per domain after the warm start and after ``rl_steps`` RL batches, under ``seed``."""
    L.seed_everything(seed, verbose=False)
    policy = _policy()
    _warm_start(policy, task["sft"], seed)
    system = PolicyOptimization(
        policy=policy, advantage=advantage, reward=RewardFn(weights={"accuracy": 1.0}),
        rollout=HFEngine(), sampling=SamplingParams(n=4, max_new_tokens=MAX_TOKENS, temperature=1.0, seed=seed),
        eval_sampling=SamplingParams(n=1, max_new_tokens=MAX_TOKENS, temperature=0.0),
        loss=LossConfig(kl_coef=0.0), optimizer=adamw(lr=lr, weight_decay=0.01),
        engine_dir=str(root / "engine"),
    )  # fmt: skip
    before = _accuracy(system, task["eval"], root)
    _trainer(root / "rl", steps=rl_steps).fit(system, datamodule=_data(task["train"], seed))
    return before, _accuracy(system, task["eval"], root)


def _gain(before: dict[str, float], after: dict[str, float]) -> float:
    """Change of the mean accuracy over the domains."""
    return float(np.mean(list(after.values())) - np.mean(list(before.values())))


def test_grpo_learns_an_input_determined_answer(task, tmp_path) -> None:
    """GRPO raises held-out accuracy (mean over the two domains) within 40 rollout batches.

    Five seeds, mean held-out accuracy before -> after (greedy, 32 records per domain): 0: .50 -> .75,
    1: .25 -> .75, 2: .25 -> .75, 3: .50 -> .75, 4: .50 -> .75 (ct reaches 1.0 in every seed). Gains .25-.50;
    the margin 0.2 sits below the smallest. A learner that does not learn gains 0 (the warm start answers at
    chance and greedy decoding gives one answer per domain).
    """
    before, after = learning_gain(task, tmp_path, GRPO(), seed=0)
    assert _gain(before, after) >= 0.2, (before, after)


def test_drpo_learns_with_a_rare_domain(task, tmp_path) -> None:
    """DRPO (domain and cluster temperatures; a rare domain with 10 % of the stream) raises held-out accuracy.

    Without KL damping (the released code's DRPO, ``drpo_nokl``), five seeds, mean accuracy before -> after
    40 batches: 0: .50 -> .75, 1: .25 -> .75, 2: .25 -> .75, 3: .50 -> .75, 4: .50 -> .75 (gains .25-.50, as
    GRPO; margin 0.2).

    With the paper's KL damping on (qoq's default DRPO) the same five seeds gain 0, .25, .50, 0, .25 (seeds 0
    and 3 still at 0 after 60 batches): in groups of 4 whose rewards mostly do not vary, 25 % or fewer of the
    responses have a positive advantage, so the damping threshold (the 75 % quantile of max(s~ * KL, 0)) is 0
    and every positive advantage is zeroed (tests/rl/test_advantages.py pins the rule). No margin separates
    learning from not learning there, so the default is not asserted here; benchmark v2 measures it.
    """
    before, after = learning_gain(task, tmp_path, DRPO(window=20, kl_damping=False), seed=0)
    assert _gain(before, after) >= 0.2, (before, after)
