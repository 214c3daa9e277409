"""Advantage estimators: hand-computed values and DRPO's invariants."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qoq.rl.advantages import (
    DRPO,
    GRPO,
    RLOO,
    AdvantageInputs,
    AdvantageOutput,
    DrGRPO,
    ReinforcePPBaseline,
    dr_grpo,
    drpo,
    grpo,
    reinforce_pp_baseline,
    rloo,
)
from qoq.rl.domain_stats import DomainStats

SQ3 = math.sqrt(3.0)


def groups(p: int, n: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(n)


# ------------------------------------------------------------------------------ simple estimators
@pytest.mark.parametrize("fn", [grpo, dr_grpo, rloo, reinforce_pp_baseline])
def test_equal_reward_groups_give_zero(fn):
    rewards = torch.tensor([0.7, 0.7, 0.7, 0.0, 0.0, 0.0])
    assert torch.equal(fn(rewards, groups(2, 3)), torch.zeros(6))


def test_grpo_one_correct_of_four():
    # mean 0.25; deviations 0.75, -0.25 x3; unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std 0.5
    # -> z = 0.75 / 0.5 = 1.5 and -0.25 / 0.5 = -0.5
    adv = grpo(torch.tensor([1.0, 0.0, 0.0, 0.0]), groups(1, 4))
    torch.testing.assert_close(adv, torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5, rtol=0)


def test_grpo_two_of_four_and_arbitrary_group_ids():
    # [1, 1, 0, 0]: mean .5, unbiased var = 4 * .25 / 3 = 1/3 -> z = +-0.5 * sqrt(3)
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    ids = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3])  # interleaved, non-contiguous ids
    adv = grpo(rewards, ids)
    h = 0.5 * SQ3
    torch.testing.assert_close(adv, torch.tensor([h, -0.5, h, 1.5, -h, -0.5, -h, -0.5]), atol=1e-5, rtol=0)


def test_dr_grpo_and_rloo_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(dr_grpo(rewards, groups(1, 4)), torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # leave-one-out: 1 - mean(0,0,0) = 1; 0 - mean(1,0,0) = -1/3
    torch.testing.assert_close(rloo(rewards, groups(1, 4)), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


def test_reinforce_pp_baseline_whitens_over_the_batch():
    # x = [.75, -.25, -.25, -.25, .5, .5, -.5, -.5]; mean 0; sum of squares .75 + 1 = 1.75; var 1.75 / 7 = .25
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    adv = reinforce_pp_baseline(rewards, groups(2, 4))
    torch.testing.assert_close(
        adv, torch.tensor([1.5, -0.5, -0.5, -0.5, 1.0, 1.0, -1.0, -1.0]), atol=1e-5, rtol=0
    )


def test_singleton_group_is_zero_not_nan():
    adv = grpo(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 1, 1]))
    assert adv[0] == 0 and torch.isfinite(adv).all()
    assert rloo(torch.tensor([1.0]), torch.tensor([0]))[0] == 0


@pytest.mark.parametrize("cls", [GRPO, DrGRPO, RLOO, ReinforcePPBaseline])
def test_stateless_estimators_protocol(cls):
    est = cls()
    out = est(AdvantageInputs(torch.tensor([1.0, 0.0, 0.0, 0.0]), groups(1, 4), torch.zeros(4, dtype=torch.long)))
    assert isinstance(out, AdvantageOutput) and out.advantages.shape == (4,)
    assert est.needs_kl is False and est.state_dict() == {}
    est.load_state_dict({})


# --------------------------------------------------------------------------------------------- DRPO
def hand_batch():
    """Domain 0: question [1,0,0,0]; domain 1: questions [1,1,0,0] and [1,0,0,0]."""
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0, 1, 0, 0, 0])
    domains = torch.tensor([0] * 4 + [1] * 8)
    return rewards, groups(3, 4), domains


def test_drpo_hand_computed_temperatures():
    # k_max = 1: one cluster per domain. Domain 0: centroid [0,0,0,1], m = .25, N = 1 -> T_d = T_c = .25.
    # Domain 1: centroid mean([0,0,1,1], [0,0,0,1]) = [0,0,.5,1], m = .375, N = 2
    #   -> T_d = T_c = sqrt(2) * .375.
    rewards, g, d = hand_batch()
    stats = DomainStats(window="batch", k_max=1)
    adv, metrics = drpo(rewards, g, d, stats)
    t1 = math.sqrt(2) * 0.375
    assert metrics["T_d"][0] == pytest.approx(0.25) and metrics["T_d"][1] == pytest.approx(t1)
    assert metrics["T_c_mean"][1] == pytest.approx(t1) and metrics["k"][1] == 1 and metrics["history"][1] == 2
    s = torch.tensor(
        [1.5, -0.5, -0.5, -0.5, 0.5 * SQ3, 0.5 * SQ3, -0.5 * SQ3, -0.5 * SQ3, 1.5, -0.5, -0.5, -0.5]
    )
    s_tilde = s / torch.tensor([0.25**2] * 4 + [t1**2] * 8)
    torch.testing.assert_close(adv, s_tilde / s_tilde.std(), atol=1e-4, rtol=1e-4)
    assert metrics["abs_adv"][0] == pytest.approx(float(adv[:4].abs().mean()), rel=1e-5)


def test_drpo_domain_only_is_the_domain_factor_alone():
    rewards, g, d = hand_batch()
    adv, metrics = drpo(rewards, g, d, DomainStats(window="batch"), domain_only=True)
    t_d = torch.tensor([float(metrics["T_d"][0])] * 4 + [float(metrics["T_d"][1])] * 8)
    s_tilde = grpo(rewards, g) / t_d
    torch.testing.assert_close(adv, s_tilde / s_tilde.std(), atol=1e-5, rtol=1e-5)
    assert all(float(v) == 1.0 for v in metrics["T_c_mean"].values())


def test_drpo_zero_mean_cluster_stays_finite():
    # Domain 0 holds only all-zero questions (domain and cluster mean exactly 0). Domain 1 holds
    # a = [0,0,0,0], b = [0,0,0,1], c = [0,1,1,1]: I1 = 2, I2 = .5 ({a, b}, {c}), I3 = 0; D2 = .5 is not
    # < .1 * D1 = .15, so k = 3 and a is a cluster of its own with mean reward 0 (T_c clamped to eps).
    rewards = torch.tensor([0.0] * 8 + [0, 0, 0, 0] + [1, 0, 0, 0] + [1, 1, 1, 0])
    domains = torch.tensor([0] * 8 + [1] * 12)
    stats = DomainStats(window="batch", k_max=3)
    adv, metrics = drpo(rewards, groups(5, 4), domains, stats)
    assert torch.isfinite(adv).all() and torch.equal(adv[:12], torch.zeros(12))
    assert metrics["T_d"][0] == pytest.approx(1e-6)  # clamped at eps
    assert stats.clusters(1).k == 3 and float(stats.clusters(1).difficulty.min()) == 0.0
    # Without the clamp (eps = 0) the same batch is 0 / 0: DRPO must raise, not return NaN.
    with pytest.raises(FloatingPointError):
        drpo(rewards, groups(5, 4), domains, DomainStats(window="batch", k_max=3), eps=0.0)


def test_drpo_kl_damping_by_hand():
    # One domain, k_max = 1, domain_only: questions [1,0,0,0] and [1,1,0,0] -> centroid [0,0,.5,1],
    # T_d = sqrt(2) * .375. s~ = s / T_d: 1.5 / T_d = 2 sqrt(2), 0.5 sqrt(3) / T_d = sqrt(8/3).
    # kl = 1 everywhere: z = max(s~, 0) = [2 sqrt2, 0, 0, 0, sqrt(8/3) x2, 0, 0];
    # t = 75% quantile of 8 values = sorted[5.25] = sqrt(8/3); damping t / (t + z) on z > 0.
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])
    g, d = groups(2, 4), torch.zeros(8, dtype=torch.long)
    stats = DomainStats(window="batch", k_max=1)
    adv, metrics = drpo(rewards, g, d, stats, kl=torch.ones(8), domain_only=True)
    a, b, t_d = 2 * math.sqrt(2), math.sqrt(8 / 3), math.sqrt(2) * 0.375
    assert float(metrics["damping_t"]) == pytest.approx(b, rel=1e-5)
    damped = torch.tensor([a * b / (a + b), -0.5 / t_d, -0.5 / t_d, -0.5 / t_d, b / 2, b / 2, -b, -b])
    torch.testing.assert_close(adv, damped / damped.std(), atol=1e-5, rtol=1e-5)
    # zero KL: no damping at all
    plain, _ = drpo(rewards, g, d, DomainStats(window="batch", k_max=1), domain_only=True)
    zero_kl, _ = drpo(
        rewards, g, d, DomainStats(window="batch", k_max=1), kl=torch.zeros(8), domain_only=True
    )
    torch.testing.assert_close(plain, zero_kl)


def test_drpo_damping_zeroes_every_positive_advantage_when_few_are_positive():
    """The paper's rule, taken literally: t is the 75 % quantile of z = max(s~ * kl, 0) over the batch, so
    when 25 % or fewer of the responses have z > 0 (a positive advantage and KL > 0), t = 0 and every
    positive advantage is multiplied by t / (t + z) = 0; only the negative ones remain. This is what stops
    damped DRPO from learning in tests/systems/test_learning.py (groups of 4 with mostly zero variance)."""
    rewards = torch.tensor([1.0, 0, 0, 0] + [0.0] * 4 + [1.0] * 4)  # one correct answer in 12
    g, d = groups(3, 4), torch.zeros(12, dtype=torch.long)
    adv, metrics = drpo(rewards, g, d, DomainStats(window="batch", k_max=1), kl=torch.full((12,), 0.01),
                        domain_only=True)  # fmt: skip
    assert float(metrics["damping_t"]) == 0.0
    assert float(adv[0]) == 0.0 and bool((adv[1:4] < 0).all())
    assert float(adv.sum()) < 0  # a push away from every sampled answer, none toward the right one
    plain, _ = drpo(rewards, g, d, DomainStats(window="batch", k_max=1), domain_only=True)
    assert float(plain[0]) > 0 and float(plain.sum()) == pytest.approx(0.0, abs=1e-6)


def test_drpo_damping_over_positive_responses_keeps_the_positive_advantage():
    """The ``drpo_damp_positive`` variant: t over the responses with z > 0 only. The batch above has one
    (response 0), so t = z_0 and its damping factor is t / (t + z_0) = 1/2. GRPO scores of group 0 are
    [1.5, -.5, -.5, -.5] (mean .25, unbiased std .5), the other groups 0; T_d cancels in the final
    standardisation (up to eps)."""
    rewards = torch.tensor([1.0, 0, 0, 0] + [0.0] * 4 + [1.0] * 4)
    g, d = groups(3, 4), torch.zeros(12, dtype=torch.long)
    adv, metrics = drpo(rewards, g, d, DomainStats(window="batch", k_max=1), kl=torch.full((12,), 0.01),
                        domain_only=True, damping_over="positive")  # fmt: skip
    assert float(metrics["damping_t"]) > 0
    damped = torch.tensor([0.75, -0.5, -0.5, -0.5] + [0.0] * 8)
    torch.testing.assert_close(adv, damped / damped.std(), atol=1e-5, rtol=1e-5)


def test_drpo_cap_clips_the_final_advantages():
    rewards, g, d = hand_batch()
    plain, _ = drpo(rewards, g, d, DomainStats(window="batch", k_max=1))
    capped, metrics = drpo(rewards, g, d, DomainStats(window="batch", k_max=1), cap=1.0)
    assert float(plain.abs().max()) > 1.0
    torch.testing.assert_close(capped, plain.clamp(-1.0, 1.0))
    assert float(metrics["capped_frac"]) == pytest.approx(float((plain.abs() > 1.0).float().mean()))
    with pytest.raises(ValueError, match="cap"):
        DRPO(cap=0.0)
    with pytest.raises(ValueError, match="damping_over"):
        DRPO(damping_over="nonzero")


def test_drpo_rejects_bad_batches():
    stats = DomainStats()
    with pytest.raises(ValueError, match="same number of rollouts"):
        drpo(torch.rand(5), torch.tensor([0, 0, 0, 1, 1]), torch.zeros(5, dtype=torch.long), stats)
    with pytest.raises(ValueError, match="different domain"):
        drpo(torch.rand(4), groups(2, 2), torch.tensor([0, 1, 1, 1]), stats)
    with pytest.raises(ValueError, match="NaN"):
        drpo(torch.tensor([1.0, math.nan, 0, 0]), groups(2, 2), torch.zeros(4, dtype=torch.long), stats)
    assert stats.num_questions() == 0  # nothing was pushed


def test_equal_reward_questions_enter_the_history():
    stats = DomainStats(window="cumulative")
    rewards = torch.tensor([1.0, 1, 1, 0, 0, 0, 1, 0, 0])
    adv, _ = drpo(rewards, groups(3, 3), torch.tensor([0] * 6 + [1] * 3), stats)
    assert stats.num_questions(0) == 2 and stats.num_questions(1) == 1
    assert torch.equal(adv[:6], torch.zeros(6))


def test_drpo_estimator_needs_kl_and_round_trips(tmp_path):
    est = DRPO(window=3, seed=1)
    assert est.needs_kl and not DRPO(kl_damping=False).needs_kl
    rewards, g, d = hand_batch()
    with pytest.raises(ValueError, match="needs kl"):
        est(AdvantageInputs(rewards, g, d))
    est(AdvantageInputs(rewards, g, d, kl=torch.full((12,), 0.01)))
    torch.save(est.state_dict(), tmp_path / "drpo.pt")
    restored = DRPO(window=3, seed=1)
    restored.load_state_dict(torch.load(tmp_path / "drpo.pt", weights_only=True))
    nxt = torch.tensor([0.0, 0, 1, 0, 1, 1, 1, 0, 0.5, 0, 1, 0])
    a, b = est(AdvantageInputs(nxt, g, d, kl=torch.full((12,), 0.02))), restored(AdvantageInputs(nxt, g, d, kl=torch.full((12,), 0.02)))
    torch.testing.assert_close(a.advantages, b.advantages, rtol=0, atol=0)


# ------------------------------------------------------------------------------- property tests
batch_strategy = st.integers(2, 6).flatmap(
    lambda p: st.tuples(
        st.just(p),
        st.integers(2, 5),
        st.lists(st.integers(0, 2), min_size=p, max_size=p),
        st.integers(0, 10_000),
    )
)


def random_batch(p, n, domains, seed, discrete):
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.rand(p * n, generator=gen)
    if discrete:
        rewards = (rewards * 4).floor() / 4
    return rewards, groups(p, n), torch.tensor(domains).repeat_interleave(n)


@settings(max_examples=25, deadline=None)
@given(batch_strategy, st.booleans(), st.booleans())
def test_drpo_group_mean_zero_and_unit_batch_std(batch, discrete, domain_only):
    p, n, domains, seed = batch
    rewards, g, d = random_batch(p, n, domains, seed, discrete)
    stats = DomainStats(window=2, k_max=3)
    drpo(rewards.roll(1), g, d, stats)  # some earlier history
    adv, _ = drpo(rewards, g, d, stats, domain_only=domain_only)
    assert torch.isfinite(adv).all()
    torch.testing.assert_close(adv.view(p, n).mean(1), torch.zeros(p), atol=1e-4, rtol=0)
    if adv.abs().max() > 0:
        assert float(adv.std()) == pytest.approx(1.0, abs=1e-3)


@settings(max_examples=25, deadline=None)
@given(batch_strategy, st.booleans())
def test_drpo_invariant_to_rollout_order(batch, discrete):
    p, n, domains, seed = batch
    rewards, g, d = random_batch(p, n, domains, seed, discrete)
    perm = torch.cat(
        [torch.randperm(n, generator=torch.Generator().manual_seed(seed + i)) + i * n for i in range(p)]
    )
    kl = torch.rand(p * n, generator=torch.Generator().manual_seed(seed)) * 0.1
    a, _ = drpo(rewards, g, d, DomainStats(window="batch"), kl=kl)
    b, _ = drpo(rewards[perm], g, d, DomainStats(window="batch"), kl=kl[perm])
    torch.testing.assert_close(b, a[perm], atol=1e-5, rtol=1e-5)
