"""Adaptive domain sampler and rollout-budget allocation: hand-computed probabilities and sizes."""

import math

import pytest

from qoq.data.adaptive import AdaptiveDomainSampler, AdaptiveSampling, AdaptiveSchedule, allocate_group_sizes


def stats(zero_var: float, reward: float) -> dict[str, float]:
    return {"zero_var_frac": zero_var, "mean_reward": reward}


def test_starts_at_the_base_mixture():
    assert AdaptiveDomainSampler(["a", "b"]).probabilities() == {"a": 0.5, "b": 0.5}
    p = AdaptiveDomainSampler(["a", "b"], base={"a": 3.0, "b": 1.0}).probabilities()
    assert p == pytest.approx({"a": 0.75, "b": 0.25})
    # a base share under the floor is lifted to it
    p = AdaptiveDomainSampler(["a", "b"], base={"a": 99.0, "b": 1.0}, floor=0.05).probabilities()
    assert p == pytest.approx({"a": 0.95, "b": 0.05})


def test_moves_toward_the_domain_whose_groups_all_scored_alike():
    # need: a = 1 (all groups flat) + (1 - .5) = 1.5, b = 0 + .5 = .5; eta = 1
    # p_a = e^1.5 / (e^1.5 + e^.5) = e / (e + 1)
    sampler = AdaptiveDomainSampler(["a", "b"], eta=1.0)
    sampler.update({"a": stats(1.0, 0.5), "b": stats(0.0, 0.5)})
    assert sampler.need() == pytest.approx({"a": 1.5, "b": 0.5})
    p = sampler.probabilities()
    assert p["a"] == pytest.approx(math.e / (math.e + 1))
    assert sum(p.values()) == pytest.approx(1.0)


def test_moves_toward_the_low_reward_domain():
    # need: a = .2 + (2 - .5) / 2 = .95, b = .2 + (2 - 1.5) / 2 = .45 with reward_range (0, 2); eta = 2
    sampler = AdaptiveDomainSampler(["a", "b"], eta=2.0, reward_range=(0.0, 2.0))
    sampler.update({"a": stats(0.2, 0.5), "b": stats(0.2, 1.5)})
    assert sampler.probabilities()["a"] == pytest.approx(1 / (1 + math.exp(-1.0)))


def test_never_below_the_floor_and_sums_to_one():
    sampler = AdaptiveDomainSampler(["a", "b", "c"], eta=50.0, floor=0.05)
    sampler.update({"a": stats(1.0, 0.0), "b": stats(0.0, 1.0), "c": stats(0.0, 0.9)})
    p = sampler.probabilities()
    assert p == pytest.approx({"a": 0.9, "b": 0.05, "c": 0.05})
    assert min(p.values()) >= 0.05 and sum(p.values()) == pytest.approx(1.0)
    # a floor of 1 / D forces the uniform mixture whatever the needs
    flat = AdaptiveDomainSampler(["a", "b", "c"], eta=50.0, floor=1 / 3)
    flat.update({"a": stats(1.0, 0.0)})
    assert flat.probabilities() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


def test_moving_average_and_unreported_domains():
    sampler = AdaptiveDomainSampler(["a", "b", "c"], momentum=0.5, zero_var_weight=1.0, low_reward_weight=0.0)
    sampler.update({"a": stats(1.0, 0.0), "b": stats(0.0, 0.0)})
    sampler.update({"a": stats(0.0, 0.0)})  # b absent: keeps its average
    # a: .5 * 1 + .5 * 0 = .5; b: 0; c never reported: the mean of the reported needs, .25
    assert sampler.need() == pytest.approx({"a": 0.5, "b": 0.0, "c": 0.25})
    assert sampler.updates == 2


def test_deterministic_and_independent_of_report_order():
    one, two = AdaptiveDomainSampler(["a", "b", "c"]), AdaptiveDomainSampler(["a", "b", "c"])
    reports = [{"a": stats(0.5, 0.3), "c": stats(0.1, 0.9)}, {"b": stats(0.8, 0.2), "a": stats(0.0, 0.6)}]
    for report in reports:
        one.update(report)
        two.update(dict(reversed(list(report.items()))))
    assert one.probabilities() == two.probabilities()
    assert one.probabilities() == one.probabilities()


def test_state_round_trip():
    sampler = AdaptiveDomainSampler(["a", "b"], momentum=0.7)
    sampler.update({"a": stats(0.4, 0.3), "b": stats(0.9, 0.1)})
    sampler.update({"a": stats(0.2, 0.5)})
    restored = AdaptiveDomainSampler(["a", "b"], momentum=0.7)
    restored.load_state_dict(sampler.state_dict())
    assert restored.probabilities() == sampler.probabilities()
    for s in (sampler, restored):
        s.update({"b": stats(0.0, 1.0)})
    assert restored.probabilities() == sampler.probabilities()
    assert restored.state_dict() == sampler.state_dict()
    with pytest.raises(ValueError, match="checkpoint domains"):
        AdaptiveDomainSampler(["a", "c"]).load_state_dict(sampler.state_dict())


def test_bad_configuration_and_reports_raise():
    with pytest.raises(ValueError, match="floor"):
        AdaptiveDomainSampler(["a", "b", "c"], floor=0.4)
    with pytest.raises(ValueError, match="base covers"):
        AdaptiveDomainSampler(["a", "b"], base={"a": 1.0})
    sampler = AdaptiveDomainSampler(["a", "b"])
    with pytest.raises(ValueError, match="unknown domain 'x'"):
        sampler.update({"x": stats(0.0, 0.0)})
    with pytest.raises(ValueError, match=r"lacks \['mean_reward'\]"):
        sampler.update({"a": {"zero_var_frac": 0.5}})
    with pytest.raises(ValueError, match="zero_var_frac must be in"):
        sampler.update({"a": stats(1.5, 0.0)})
    assert sampler.updates == 0 and sampler.state_dict()["zero_var"] == {}  # a bad report changes nothing


# ------------------------------------------------------------------------------------ the schedule
def _schedule(**kw) -> AdaptiveSchedule:
    settings = AdaptiveSampling(**{"momentum": 0.0, "eta": 1.0, "floor": 0.1, "lag": 2, **kw})
    return AdaptiveSchedule(settings.sampler(["a", "b"]), lag=settings.lag, keep=3)


def test_schedule_draws_batch_b_with_the_report_of_batch_b_minus_lag():
    schedule = _schedule()
    assert schedule.probabilities(0) == schedule.probabilities(1) == [0.5, 0.5]  # nothing to lag behind yet
    with pytest.raises(RuntimeError, match="statistics of batch 0"):
        schedule.probabilities(2)  # its report may still come: never drawn from a guess
    # batch 0: every group of a scored alike -> need a = 1 + .5, b = 0 + .5 -> p_a = e / (e + 1)
    schedule.observe(0, {"a": stats(1.0, 0.5), "b": stats(0.0, 0.5)})
    p_a = math.e / (math.e + 1)
    assert schedule.probabilities(2) == pytest.approx([p_a, 1 - p_a])
    assert schedule.probabilities(1) == [0.5, 0.5]  # batch 1 was drawn before the report: unchanged
    schedule.observe(1, {"a": stats(0.0, 0.5), "b": stats(0.0, 0.5)})  # momentum 0: back to even
    assert schedule.probabilities(3) == pytest.approx([0.5, 0.5])
    assert schedule.probabilities(2) == pytest.approx([p_a, 1 - p_a])  # still the report of batch 0
    with pytest.raises(ValueError, match="after the report for batch 1"):
        schedule.observe(1, {"a": stats(0.0, 0.5)})


def test_schedule_never_goes_below_the_floor():
    schedule = _schedule(eta=50.0)
    schedule.observe(0, {"a": stats(1.0, 0.0), "b": stats(0.0, 1.0)})
    assert schedule.probabilities(2) == pytest.approx([0.9, 0.1])  # b at the floor 0.1, a takes the rest


def test_schedule_state_round_trip_and_gaps():
    schedule = _schedule()
    for index, z in [(0, 1.0), (1, 0.5), (3, 0.0), (4, 0.25)]:  # no report for batch 2
        schedule.observe(index, {"a": stats(z, 0.5), "b": stats(0.0, 0.5)})
    restored = _schedule()
    restored.load_state_dict(schedule.state_dict())
    for b in (5, 6):  # the last report (batch 4) counts from batch 6 on
        assert restored.probabilities(b) == schedule.probabilities(b)
    # batch 4 lags to batch 2, which had no report: the state after batch 1's report
    assert restored.probabilities(4) == schedule.probabilities(3)
    with pytest.raises(RuntimeError, match="older than the kept snapshots"):
        restored.probabilities(2)  # keep=3: the snapshot of batch 0 is gone
    for s in (schedule, restored):
        s.observe(5, {"a": stats(0.0, 0.0), "b": stats(1.0, 1.0)})
    assert restored.state_dict() == schedule.state_dict()
    with pytest.raises(ValueError, match="lag"):
        AdaptiveSchedule(AdaptiveSampling(lag=3).sampler(["a", "b"]), lag=3).load_state_dict(schedule.state_dict())


# ------------------------------------------------------------------------------ group-size allocation
def test_allocate_group_sizes_proportional_to_difficulty():
    # extra 14 - 3 * 2 = 8 shared .25 / .75 -> +0, +2, +6
    assert allocate_group_sizes([0.0, 1.0, 3.0], budget=14, n_min=2, n_max=8) == [2, 4, 8]


def test_allocate_group_sizes_caps_and_reshares():
    # extra 9: ideal 1.125, 1.125, 6.75 -> prompt 2 capped at +4; 5 left for prompts 0, 1: 2.5 each ->
    # floors 2, 2 and the last one to the lower index (equal remainders)
    assert allocate_group_sizes([1.0, 1.0, 6.0], budget=15, n_min=2, n_max=6) == [5, 4, 6]


def test_allocate_group_sizes_uniform_when_no_difficulty_and_exact_budget():
    assert allocate_group_sizes([0.0, 0.0, 0.0], budget=7, n_min=2, n_max=4) == [3, 2, 2]
    sizes = allocate_group_sizes([0.3, 0.1, 0.7, 0.2, 0.9], budget=23, n_min=2, n_max=8)
    assert sum(sizes) == 23 and all(2 <= n <= 8 for n in sizes)
    assert sizes.index(max(sizes)) == 4 and sizes.index(min(sizes)) == 1


def test_allocate_group_sizes_rejects_impossible_budgets():
    with pytest.raises(ValueError, match="budget 5 outside"):
        allocate_group_sizes([1.0, 1.0, 1.0], budget=5, n_min=2, n_max=4)
    with pytest.raises(ValueError, match="difficulties"):
        allocate_group_sizes([1.0, -1.0], budget=4, n_min=2, n_max=4)
