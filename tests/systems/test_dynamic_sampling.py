"""DAPO-style dynamic sampling: which groups a step keeps, how it refills, where it stops (fake engine)."""

from __future__ import annotations

import pytest
import torch

from qoq.rl.rewards import RewardOutput
from qoq.rl.rollout import ScriptedEngine
from qoq.systems.dynamic_sampling import DynamicSampling, collect_dynamic, collect_plain
from qoq.types import ModalityBatch, PromptBatch, SamplingParams

#: Rewards of the two rollouts of each prompt: equal pairs are zero-variance groups.
REWARDS = {
    "a": (1.0, 1.0), "b": (0.0, 1.0), "c": (0.0, 0.0), "d": (0.5, 0.5),  # batch 0: only b informative
    "e": (0.2, 0.7), "f": (1.0, 1.0), "g": (0.0, 0.3), "h": (0.9, 0.1),  # draw 1: e, g, h informative
    "i": (0.0, 0.0), "j": (1.0, 1.0), "k": (0.0, 0.0), "l": (1.0, 1.0),  # draw 2: nothing
}  # fmt: skip


def _batch(ids: str, domain_ids: list[int] | None = None) -> PromptBatch:
    p = len(ids)
    return PromptBatch(
        ids=list(ids),
        texts=[f"prompt {c}" for c in ids],
        modalities={"image": ModalityBatch(torch.arange(p, dtype=torch.float32)[:, None] * torch.ones(p, 3),
                                           torch.arange(p))},  # fmt: skip
        targets=[None] * p,  # the fake reward reads the ids
        domains=["ct"] * p,
        datasets=["toy"] * p,
        domain_ids=torch.tensor(domain_ids or [3] * p),
        references=None,
        origins=["real"] * p,
        stream_index=7,
    )


class _Generate:
    """Two rollouts per prompt from :class:`ScriptedEngine`: response j of prompt c in generation k is
    ``c`` repeated j + 1 + k times (later generations are longer: the merge pads them)."""

    def __init__(self) -> None:
        self.engine = ScriptedEngine()
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, prompts: PromptBatch, k: int):
        self.calls.append((list(prompts.ids), k))
        self.engine.texts = [c * (j + 1 + k) for c in prompts.ids for j in range(2)]
        embeds = [torch.full((3, 2), float(ord(c))) for c in prompts.ids]
        rollout = self.engine.generate(embeds, SamplingParams(n=2, max_new_tokens=8))
        total = torch.tensor([REWARDS[c][j] for c in prompts.ids for j in range(2)])
        return embeds, rollout, RewardOutput(total, {"accuracy": total.clone()})


def _draws(*batches: str):
    def draw(k: int) -> PromptBatch:
        return _batch(batches[k - 1])

    return draw


def test_keeps_only_groups_with_a_reward_spread_and_refills_to_the_target() -> None:
    engine = _Generate()
    out = collect_dynamic(_batch("abcd"), engine, _draws("efgh", "ijkl"), DynamicSampling(max_gen_batches=3), pad_id=9)
    # target 4 groups: b from the batch, then e, g, h from the first refill -> full after 2 generations
    assert out.batch.ids == ["b", "e", "g", "h"]
    assert out.gen_batches == 2 and out.kept_groups == 4
    assert [c for c, _ in engine.calls] == [list("abcd"), list("efgh")] and [k for _, k in engine.calls] == [0, 1]
    assert out.metrics == {"gen_batches": 2.0, "informative_group_frac": 4 / 8, "kept_groups": 4.0}
    # responses follow their prompts; the shorter generation is padded with pad_id and masked out
    assert out.rollout.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert out.rollout.texts == ["b", "bb", "ee", "eee", "gg", "ggg", "hh", "hhh"]
    assert out.rollout.response_ids.shape == (8, 4)  # the longer generation's width (EOS included)
    assert out.rollout.response_ids[0].tolist() == [ord("b"), 1, 0, 9]  # EOS, engine pad, then merge pad
    assert out.rollout.engine_logprobs is None and out.rollout.truncated.shape == (8,)
    assert out.rollout.response_mask.sum(-1).tolist() == [2, 3, 3, 4, 3, 4, 3, 4]
    assert out.scored.total.tolist() == pytest.approx([0.0, 1.0, 0.2, 0.7, 0.0, 0.3, 0.9, 0.1])
    assert torch.equal(out.scored.components["accuracy"], out.scored.total)
    assert [float(e[0, 0]) for e in out.embeds] == [float(ord(c)) for c in "begh"]
    # modality items follow their prompts (b was item 1 of the first batch; e, g, h items 0, 2, 3 of the second)
    assert out.batch.modalities["image"].values[:, 0].tolist() == [1.0, 0.0, 2.0, 3.0]
    assert out.batch.modalities["image"].owner.tolist() == [0, 1, 2, 3]
    # every generated group counts for the domain statistics, kept or not
    assert out.generated_rewards.shape == (16,) and out.generated_groups.unique().tolist() == list(range(8))


def test_stops_at_the_cap_and_trains_on_what_it_has() -> None:
    engine = _Generate()
    out = collect_dynamic(_batch("abcd"), engine, _draws("ijkl", "ijkl"), DynamicSampling(max_gen_batches=2), pad_id=0)
    assert len(engine.calls) == 2 and out.gen_batches == 2
    assert out.batch.ids == ["b"] and out.kept_groups == 1 and out.rollout.texts == ["b", "bb"]
    assert len(engine.engine.calls) == 2 and engine.engine.syncs == 0


def test_keeps_the_first_informative_groups_when_a_refill_overshoots() -> None:
    out = collect_dynamic(_batch("ab"), _Generate(), _draws("efgh"), DynamicSampling(max_gen_batches=5), pad_id=0)
    assert out.batch.ids == ["b", "e"] and out.gen_batches == 2  # g and h dropped: the target is 2


def test_no_informative_group_falls_back_to_the_batch_as_is() -> None:
    out = collect_dynamic(_batch("acd"), _Generate(), _draws("ijkl"), DynamicSampling(max_gen_batches=2), pad_id=0)
    assert out.batch.ids == ["a", "c", "d"] and out.kept_groups == 0 and out.gen_batches == 2
    assert out.metrics["informative_group_frac"] == 0.0 and len(out.rollout) == 6


def test_plain_collection_and_settings() -> None:
    out = collect_plain(_batch("abcd"), _Generate())
    assert out.batch.ids == list("abcd") and out.gen_batches == 1 and out.kept_groups == 4 and not out.metrics
    with pytest.raises(ValueError, match="max_gen_batches"):
        DynamicSampling(max_gen_batches=0)
