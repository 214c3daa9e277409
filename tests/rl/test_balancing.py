"""Balancing estimators (GDPO-style, DISCO-style, FairGRPO-style) and DAPO-style dynamic filtering:
hand-computed values, invariants, state round-trips."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qoq.rl.advantages import (
    DISCO,
    AdvantageInputs,
    ComponentNormalized,
    FairGRPO,
    component_normalized,
    disco,
    fairness_weights,
    grpo,
    masked_group_zscore,
)
from qoq.rl.groups import domain_batch_stats, filter_zero_variance
from qoq.systems.dynamic_sampling import DynamicSamplingBuffer

NAN = float("nan")
PAPER = {"accuracy": 0.6, "iou": 0.2, "format": 0.2}


def groups(p: int, n: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(n)


# ---------------------------------------------------------------------- per-component normalisation
def two_groups() -> dict[str, torch.Tensor]:
    # group 0 (has a box): accuracy [1, 0, 0], iou [.5, .2, .2], format [1, 1, 0]
    # group 1 (no box):    accuracy [1, 1, 0], iou n/a,          format [1, 1, 1]
    return {
        "accuracy": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]),
        "iou": torch.tensor([0.5, 0.2, 0.2, NAN, NAN, NAN]),
        "format": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0]),
    }


def test_masked_group_zscore_by_hand():
    # [.5, .2, .2]: mean .3, deviations .2 -.1 -.1, unbiased var .06 / 2 = .03 -> z = 2/sqrt(3), -1/sqrt(3)
    # [NaN, 4, 6]: stats over (4, 6): mean 5, std sqrt(2) -> z = -1/sqrt(2), 1/sqrt(2); NaN -> 0
    # [NaN, 3, NaN]: one applicable response -> 0
    values = torch.tensor([0.5, 0.2, 0.2, NAN, 4.0, 6.0, NAN, 3.0, NAN])
    z = masked_group_zscore(values, groups(3, 3), eps=0.0)
    s3, s2 = math.sqrt(3.0), math.sqrt(2.0)
    expected = torch.tensor(
        [2 / s3, -1 / s3, -1 / s3, 0.0, -1 / s2, 1 / s2, 0.0, 0.0, 0.0], dtype=torch.float64
    )
    torch.testing.assert_close(z, expected, atol=1e-9, rtol=0)


def test_component_normalized_two_groups_by_hand():
    # z-scores (u = 1/sqrt(3)):
    #   group 0: accuracy [2u, -u, -u], iou [2u, -u, -u], format [u, u, -2u]
    #            a = .6 acc + .2 iou + .2 fmt = [1.8u, -.6u, -1.2u] (= .6u x [3, -1, -2])
    #   group 1: accuracy [u, u, -2u], iou NaN -> 0, format all equal -> 0
    #            a = [.6u, .6u, -1.2u] (= .6u x [1, 1, -2])
    # batch: mean 0; unbiased var = (9 + 1 + 4 + 1 + 1 + 4) / 5 = 4 (units .6u) -> std 2
    adv = component_normalized(two_groups(), groups(2, 3), PAPER, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -1.0, 0.5, 0.5, -1.0]), atol=1e-6, rtol=0)


def test_component_normalized_renormalize_lifts_groups_without_a_box():
    # group 1 has accuracy and format only (.8 of the weight): its sum is scaled by 1 / .8
    adv = component_normalized(two_groups(), groups(2, 3), PAPER, eps=0.0, renormalize=True)
    a = torch.tensor([3.0, -1.0, -2.0, 1.25, 1.25, -2.5])
    torch.testing.assert_close(adv, a / a.std(), atol=1e-6, rtol=0)


def test_component_normalized_separates_what_grpo_collapses():
    # GDPO's motivating case: group A gets (acc, fmt) = (1, 0) vs (0, 0), group B (1, 1) vs (0, 0).
    # GRPO on the totals [1, 0] and [2, 0] gives both groups the same +-1/sqrt(2); per-component
    # normalisation gives B twice A's advantage (A: z_acc = +-1/sqrt(2), z_fmt = 0; B: both +-1/sqrt(2)).
    comps = {"accuracy": torch.tensor([1.0, 0.0, 1.0, 0.0]), "format": torch.tensor([0.0, 0.0, 1.0, 0.0])}
    totals = comps["accuracy"] + comps["format"]
    g = groups(2, 2)
    g_adv = grpo(totals, g, eps=0.0)
    torch.testing.assert_close(g_adv[:2], g_adv[2:])
    adv = component_normalized(comps, g, {"accuracy": 1.0, "format": 1.0}, eps=0.0)
    torch.testing.assert_close(adv[2:], 2 * adv[:2], atol=1e-6, rtol=0)
    a = torch.tensor([1.0, -1.0, 2.0, -2.0])
    torch.testing.assert_close(adv, a / a.std(), atol=1e-6, rtol=0)


def test_component_normalized_estimator_uses_call_weights_unless_configured():
    comps, g, d = two_groups(), groups(2, 3), torch.zeros(6, dtype=torch.long)
    est = ComponentNormalized(eps=0.0)
    assert not est.needs_kl
    out = est(AdvantageInputs(torch.zeros(6), g, d, components=comps, weights=PAPER))
    torch.testing.assert_close(
        out.advantages, torch.tensor([1.5, -0.5, -1.0, 0.5, 0.5, -1.0]), atol=1e-6, rtol=0
    )
    assert out.metrics["iou_signal_frac"].item() == pytest.approx(0.5)  # only group 0 has an IoU spread
    # accuracy only: the weights in the config win over the caller's
    only_acc = ComponentNormalized(eps=0.0, weights={"accuracy": 1.0})(AdvantageInputs(
        torch.zeros(6), g, d, components=comps, weights=PAPER
    ))
    expected = masked_group_zscore(comps["accuracy"], g, 0.0)
    torch.testing.assert_close(only_acc.advantages.double(), expected / expected.std(), atol=1e-6, rtol=0)


def test_component_normalized_errors_name_the_problem():
    g, d = groups(2, 3), torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="needs the reward components"):
        ComponentNormalized()(AdvantageInputs(torch.zeros(6), g, d, weights=PAPER))
    with pytest.raises(ValueError, match="needs weights"):
        ComponentNormalized()(AdvantageInputs(torch.zeros(6), g, d, components=two_groups()))
    with pytest.raises(ValueError, match="'length'"):
        component_normalized(two_groups(), g, {"accuracy": 1.0, "length": 0.1})
    with pytest.raises(ValueError, match="no non-zero weight"):
        component_normalized(two_groups(), g, {"accuracy": 0.0})


def test_component_normalized_all_flat_gives_zero():
    comps = {"accuracy": torch.ones(4), "format": torch.zeros(4)}
    adv = component_normalized(comps, groups(2, 2), {"accuracy": 0.5, "format": 0.5})
    assert torch.equal(adv, torch.zeros(4))


# --------------------------------------------------------------------------------------------- DISCO
def test_disco_domain_weight_is_log_inverse_frequency():
    # domain 0: 3 questions, domain 1: 1 question; each group [1, 0] -> GRPO z = +-1/sqrt(2), population
    # std .5 = sigma_max -> u = 1, w_diff = 2 everywhere. w_dom: log(1 + 4/3) and log(1 + 4).
    rewards = torch.tensor([1.0, 0.0] * 4)
    g, d = groups(4, 2), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    adv, metrics = disco(rewards, g, d, {0: 0.75, 1: 0.25}, eps=0.0)
    a0, a1 = math.log(7 / 3), math.log(5.0)
    std = math.sqrt((6 * a0**2 + 2 * a1**2) / 7)
    expected = torch.tensor([a0, -a0, a0, -a0, a0, -a0, a1, -a1]) / std
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert metrics["w_dom"][1].item() == pytest.approx(a1, rel=1e-6)
    assert metrics["w_diff_mean"][0].item() == pytest.approx(2.0)


def test_disco_difficulty_weight_favours_uncertain_groups():
    # [1, 0, 0, 0]: z = 1.5, -.5 x3; sigma = sqrt(3)/4 -> u = sqrt(3)/2, w = 1 + lambda u
    # [1, 1, 0, 0]: z = +-sqrt(3)/2;  sigma = 1/2       -> u = 1,         w = 1 + lambda
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    g, d = groups(2, 4), torch.zeros(8, dtype=torch.long)
    h = math.sqrt(3.0) / 2
    for lam in (0.0, 2.0):
        adv, _ = disco(rewards, g, d, {0: 1.0}, difficulty_scale=lam, eps=0.0)
        w0, w1 = 1 + lam * h, 1 + lam
        s = torch.tensor([1.5 * w0, -0.5 * w0, -0.5 * w0, -0.5 * w0, h * w1, h * w1, -h * w1, -h * w1])
        torch.testing.assert_close(adv, s / s.std(), atol=1e-6, rtol=0)


def test_disco_estimator_frequencies_follow_the_questions_seen():
    est = DISCO()
    d = torch.tensor([0, 0, 0, 0, 1, 1])
    est(AdvantageInputs(torch.tensor([1.0, 0.0] * 3), groups(3, 2), d))  # domain 0: 2 questions, domain 1: 1
    out = est(AdvantageInputs(torch.tensor([1.0, 0.0, 0.0, 1.0]), groups(2, 2), torch.tensor([1, 1, 1, 1])))  # domain 1: +2
    assert est.state_dict() == {"seen": {"domains": [0, 1], "counts": [2, 3]}}
    assert out.metrics["frequency"][1].item() == pytest.approx(0.6)
    assert out.metrics["w_dom"][1].item() == pytest.approx(math.log(1 + 1 / 0.6), rel=1e-6)
    fresh = DISCO()
    fresh.load_state_dict(est.state_dict())
    batch = (torch.tensor([0.0, 1.0, 1.0, 1.0]), groups(2, 2), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(fresh(AdvantageInputs(*batch)).advantages, est(AdvantageInputs(*batch)).advantages)


# ------------------------------------------------------------------------------------------ FairGRPO
def test_fairness_weights_by_hand():
    w = fairness_weights({0: 0.5, 1: 0.0}, {0: 16, 1: 4}, alpha=0.5, beta=1.0, floor=0.1)
    assert w == pytest.approx({0: 1 / (4 * 0.5), 1: 1 / (2 * 0.1)})
    assert fairness_weights({0: 0.5}, {0: 9}, alpha=0.0, beta=0.0) == {0: 1.0}


def test_fairgrpo_weights_worse_and_rarer_groups_up_by_hand():
    # domain 0: one group [1, 0, 0] (mean 1/3), domain 1: one group [1, 1, 0] (mean 2/3); N = 1 each
    # w = 1 / m -> 3 and 1.5; GRPO z (u = 1/sqrt(3)): [2u, -u, -u], [u, u, -2u]
    # s~ = [6u, -3u, -3u, 1.5u, 1.5u, -3u]; A = s~ / std(s~)
    est = FairGRPO(momentum=0.5, eps=0.0)
    out = est(AdvantageInputs(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]), groups(2, 3), torch.tensor([0, 0, 0, 1, 1, 1])))
    s = torch.tensor([6.0, -3.0, -3.0, 1.5, 1.5, -3.0])
    torch.testing.assert_close(out.advantages, s / s.std(), atol=1e-6, rtol=0)
    assert out.metrics["weight"][0].item() == pytest.approx(4 / 3)  # normalised to mean 1 over the batch
    # step 2, domain 0 only, mean 1/2 (N = 1 + 2 = 3): m0 = .5 * 1/3 + .5 * 1/2 = 5/12
    est(AdvantageInputs(torch.tensor([1.0, 0.0, 0.0, 1.0]), groups(2, 2), torch.zeros(4, dtype=torch.long)))
    state = est.state_dict()
    assert state["seen"] == {"domains": [0, 1], "counts": [3, 1]}
    assert state["running_reward"] == pytest.approx([5 / 12, 2 / 3])


def test_fairgrpo_state_round_trip_gives_identical_advantages():
    est = FairGRPO()
    est(AdvantageInputs(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0]), groups(3, 2), torch.tensor([0, 0, 1, 1, 2, 2])))
    fresh = FairGRPO()
    fresh.load_state_dict(est.state_dict())
    batch = (torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.0]), groups(3, 2), torch.tensor([0, 0, 1, 1, 2, 2]))
    torch.testing.assert_close(fresh(AdvantageInputs(*batch)).advantages, est(AdvantageInputs(*batch)).advantages)
    assert fresh.state_dict() == est.state_dict()


# ---------------------------------------------------------------------------- shared contract checks
ESTIMATORS = [DISCO, FairGRPO]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=6),
    data=st.data(),
)
def test_reweighting_keeps_group_means_zero_and_finite(sizes, data):
    # unequal group sizes are fine (unlike DRPO); each group keeps mean zero, the batch has unit std
    n = sum(sizes)
    rewards = torch.tensor(data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=n, max_size=n)))
    g = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    dom = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=len(sizes), max_size=len(sizes))))[g]
    for cls in ESTIMATORS:
        adv = cls()(AdvantageInputs(rewards, g, dom)).advantages
        assert torch.isfinite(adv).all()
        means = torch.zeros(len(sizes)).index_add_(0, g, adv) / torch.tensor(sizes)
        torch.testing.assert_close(means, torch.zeros(len(sizes)), atol=1e-5, rtol=0)
        if bool((adv != 0).sum() > 1):
            assert adv.std().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_group_spanning_two_domains_raises(cls):
    with pytest.raises(ValueError, match="different domain ids"):
        cls()(AdvantageInputs(torch.tensor([1.0, 0.0, 1.0, 0.0]), groups(2, 2), torch.tensor([0, 1, 1, 1])))


@pytest.mark.parametrize("cls", [*ESTIMATORS, ComponentNormalized])
def test_non_finite_rewards_raise_and_components_are_accepted(cls):
    est = cls()
    kw = {"components": {"accuracy": torch.tensor([1.0, 0.0, 1.0, 0.0])}, "weights": {"accuracy": 1.0}}
    with pytest.raises(ValueError, match="NaN or inf"):
        est(AdvantageInputs(torch.tensor([1.0, NAN, 1.0, 0.0]), groups(2, 2), torch.zeros(4, dtype=torch.long), **kw))
    out = est(AdvantageInputs(
        torch.tensor([1.0, 0.0, 1.0, 0.0]), groups(2, 2), torch.zeros(4, dtype=torch.long), kl=None, **kw
    ))
    assert out.advantages.shape == (4,) and est.needs_kl is False


# ------------------------------------------------------------------------------- dynamic filtering
def test_filter_zero_variance_by_hand():
    # ids 4: [1, 1] flat; 2: [0, 1] kept; 9: [.5, .5] flat; 7: single response -> flat
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, 0.0])
    ids = torch.tensor([4, 4, 2, 2, 9, 9, 7])
    assert filter_zero_variance(rewards, ids).tolist() == [True, False, False, False]  # ids 2, 4, 7, 9
    close = torch.tensor([0.5, 0.5004, 0.0, 1.0])
    assert filter_zero_variance(close, groups(2, 2), tol=1e-3).tolist() == [False, True]


def test_domain_batch_stats_by_hand():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    stats = domain_batch_stats(rewards, groups(3, 2), torch.tensor([3, 3, 3, 3, 5, 5]))
    assert stats == {
        3: {"zero_var_frac": 0.5, "mean_reward": 0.75, "groups": 2},
        5: {"zero_var_frac": 1.0, "mean_reward": 0.0, "groups": 1},
    }


def test_dynamic_sampling_buffer_collects_up_to_the_cap():
    buf = DynamicSamplingBuffer(target_groups=3)
    # batch 1: groups 0 flat, 1 informative, 2 flat, 3 flat -> keeps group 1
    keep = buf.add(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0]), groups(4, 2))
    assert keep.tolist() == [False, False, True, True, False, False, False, False]
    assert (buf.num_groups, buf.full, buf.done) == (1, False, False)
    # batch 2: three informative groups (1, 2, 3), room for two -> keeps groups 1 and 2
    keep = buf.add(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0]), groups(4, 2))
    assert keep.tolist() == [False, False, True, True, True, True, False, False]
    assert (buf.num_groups, buf.batches, buf.full, buf.done) == (3, 2, True, True)
    torch.testing.assert_close(buf.rewards(), torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0, 0.0]))
    assert buf.group_ids().tolist() == [0, 0, 1, 1, 2, 2]
    assert buf.metrics() == {"gen_batches": 2.0, "informative_group_frac": 4 / 8}
    with pytest.raises(RuntimeError, match="full"):
        buf.add(torch.tensor([0.0, 1.0]), groups(1, 2))
    buf.reset()
    assert (buf.num_groups, buf.batches, buf.group_ids().numel()) == (0, 0, 0)


def test_dynamic_sampling_buffer_stops_at_max_batches():
    buf = DynamicSamplingBuffer(target_groups=5, max_batches=2)
    for _ in range(2):
        assert not buf.done
        buf.add(torch.tensor([1.0, 1.0, 0.0, 1.0]), groups(2, 2))
    assert buf.done and not buf.full and buf.num_groups == 2
