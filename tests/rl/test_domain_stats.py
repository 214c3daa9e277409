"""DomainStats: windows, clustering (elbow), caching, state round-trips and data-parallel merges."""

import pytest
import torch

from qoq.rl.advantages import drpo
from qoq.rl.domain_stats import DomainStats, cluster_histories, cluster_history, unique_rows


def step_batch(step: int, q: int = 6, n: int = 4, domains: int = 2):
    gen = torch.Generator().manual_seed(step)
    vectors = (torch.rand(q, n, generator=gen) * 4).floor() / 4  # [q, n]
    return vectors, torch.arange(q) % domains


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    """Rows in lexicographic order (how DomainStats returns a history)."""
    for col in reversed(range(rows.shape[1])):
        rows = rows[rows[:, col].argsort(stable=True)]
    return rows


def three_levels(jitter: bool) -> torch.Tensor:
    """10 rows at each level 0, .5, 1 (with ``jitter``, half of them get +.01 on the last entry)."""
    rows = []
    for level in (0.0, 0.5, 1.0):
        for i in range(10):
            row = torch.full((4,), level)
            if jitter and i % 2:
                row[3] += 0.01
            rows.append(row)
    return torch.stack(rows)


# --------------------------------------------------------------------------------------- clustering
def test_elbow_picks_k_cap_when_no_drop_is_small():
    # 3 distinct rows: I1 = 20 (each row at squared distance 4 * .25 = 1 from .5), I2 = 5, I3 = 0:
    # D2 = 5 is not < .1 * D1 = 1.5, so k = k_cap = 3.
    fit = cluster_history(three_levels(jitter=False), k_max=10)
    assert fit.k == 3 and fit.num_distinct == 3 and fit.num_questions == 30
    torch.testing.assert_close(fit.inertias, torch.tensor([20.0, 5.0, 0.0], dtype=torch.float64))
    assert sorted(fit.difficulty.tolist()) == pytest.approx([0.0, 0.5, 1.0])
    assert fit.sizes.tolist() == [10.0, 10.0, 10.0]


def test_elbow_stops_at_the_knee():
    # With a .01 jitter there are 6 distinct rows; D3 (splitting a level) is tiny next to D2: k = 3.
    fit = cluster_history(three_levels(jitter=True), k_max=10)
    assert fit.num_distinct == 6 and fit.k == 3
    assert fit.assign(torch.tensor([[0.0, 0, 0, 0.01], [1.0, 1, 1, 1]])).tolist() != [0, 0]


def test_k_max_one_is_the_domain_mean():
    fit = cluster_history(three_levels(jitter=True), k_max=1)
    assert fit.k == 1 and fit.sizes.tolist() == [30.0]
    # 15 of 30 rows carry +.01 on one of 4 entries: mean .5 + .01 * 15 / 30 / 4 = .50125
    assert float(fit.difficulty[0]) == pytest.approx(0.50125, abs=1e-6)


def test_clustering_is_deterministic_and_row_order_free():
    rows = torch.rand(60, 4, generator=torch.Generator().manual_seed(0)).sort(1).values
    a = cluster_history(rows, k_max=5, seed=3)
    b = cluster_history(rows[torch.randperm(60)], k_max=5, seed=3)
    assert a.k == b.k
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=0)


def test_torch_and_sklearn_backends_agree_on_separated_data():
    pytest.importorskip("sklearn")
    rows = three_levels(jitter=True)
    a, b = cluster_history(rows, backend="torch"), cluster_history(rows, backend="sklearn")
    assert a.k == b.k == 3
    order_a, order_b = a.difficulty.argsort(), b.difficulty.argsort()
    torch.testing.assert_close(a.centroids[order_a], b.centroids[order_b])
    assert a.sizes[order_a].tolist() == b.sizes[order_b].tolist() == [10.0, 10.0, 10.0]


# ------------------------------------------------------------------------------------------ windows
@pytest.mark.parametrize(("window", "kept_steps"), [("cumulative", 5), (2, 2), ("batch", 1)])
def test_window_keeps_the_right_steps(window, kept_steps):
    stats = DomainStats(window=window)
    for step in range(5):
        stats.push(*step_batch(step))
    assert stats.num_questions() == 6 * kept_steps and stats.step == 4
    expected = torch.cat([step_batch(s)[0][0::2].sort(1).values for s in range(5 - kept_steps, 5)])
    assert torch.equal(stats.history(0), sorted_rows(expected))  # the history is a multiset


def test_window_evicts_domains_that_stop_appearing():
    stats = DomainStats(window=2)
    stats.push(torch.ones(2, 3), torch.tensor([0, 1]), step=0)
    stats.push(torch.ones(1, 3), torch.tensor([1]), step=1)
    stats.push(torch.ones(1, 3), torch.tensor([1]), step=2)
    assert stats.domains == [1] and stats.history(0).shape == (0, 3)


def test_push_validates_input():
    stats = DomainStats()
    stats.push(torch.zeros(2, 4), torch.tensor([0, 1]), step=3)
    with pytest.raises(ValueError, match="rollouts per question"):
        stats.push(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="before the last pushed step"):
        stats.push(torch.zeros(2, 4), torch.tensor([0, 1]), step=2)
    with pytest.raises(ValueError, match="window"):
        DomainStats(window="forever")
    with pytest.raises(KeyError, match="no history"):
        stats.clusters(7)


def test_clusters_are_refit_only_for_changed_domains():
    stats = DomainStats(window="cumulative")
    stats.push(*step_batch(0))
    fit0, fit1 = stats.clusters(0), stats.clusters(1)
    assert stats.clusters(0) is fit0  # cached
    stats.push(torch.ones(1, 4), torch.tensor([1]))  # only domain 1 changes
    assert stats.clusters(0) is fit0 and stats.clusters(1) is not fit1
    assert stats.clusters(1).num_questions == fit1.num_questions + 1


# ---------------------------------------------------------------------------------- state and merge
@pytest.mark.parametrize("window", ["cumulative", 3, "batch"])
def test_state_dict_round_trip_through_torch_save(tmp_path, window):
    stats = DomainStats(window=window, seed=2)
    for step in range(4):
        stats.push(*step_batch(step))
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    restored = DomainStats(window=window, seed=2)
    restored.load_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    assert restored.step == stats.step and restored.domains == stats.domains
    for d in stats.domains:
        torch.testing.assert_close(restored.history(d), stats.history(d), rtol=0, atol=0)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0, 0.5, 0.5, 0, 1])
    g, d = torch.arange(3).repeat_interleave(4), torch.tensor([0] * 4 + [1] * 8)
    a, _ = drpo(rewards, g, d, stats)
    b, _ = drpo(rewards, g, d, restored)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("window", ["cumulative", 2])
def test_merge_of_two_ranks_equals_the_combined_batch(window):
    ranks = [DomainStats(window=window), DomainStats(window=window)]
    combined = DomainStats(window=window)
    for step in range(3):
        vectors, domains = step_batch(step, q=8)
        ranks[0].push(vectors[:4], domains[:4], step)
        ranks[1].push(vectors[4:], domains[4:], step)
        combined.push(vectors, domains, step)
    merged = ranks[0]
    merged.merge([ranks[1]])
    assert merged.step == combined.step and merged.domains == combined.domains
    for d in combined.domains:
        assert torch.equal(merged.history(d), combined.history(d))
        torch.testing.assert_close(
            merged.clusters(d).centroids, combined.clusters(d).centroids, rtol=0, atol=0
        )


def test_merge_rejects_mismatched_windows():
    with pytest.raises(ValueError, match="window"):
        DomainStats(window=2).merge([DomainStats(window=3)])


def test_unique_rows_matches_torch_unique():
    rows = (torch.rand(200, 3, generator=torch.Generator().manual_seed(1)) * 3).floor()
    rows[0] = torch.tensor([-0.0, 1.0, 2.0])
    rows[1] = torch.tensor([0.0, 1.0, 2.0])  # -0.0 == 0.0
    got_rows, got_counts = unique_rows(rows)
    want_rows, want_counts = torch.unique(rows, dim=0, return_counts=True)
    assert torch.equal(got_rows, want_rows) and torch.equal(got_counts, want_counts)
    again = unique_rows(torch.cat([got_rows, got_rows]), torch.cat([got_counts, got_counts]))
    assert torch.equal(again[1], 2 * want_counts)


def test_cumulative_history_is_stored_compactly():
    stats = DomainStats(window="cumulative")
    for step in range(20):
        stats.push(torch.tensor([[1.0, 0, 0], [0, 0, 1], [1, 1, 1]]), torch.zeros(3, dtype=torch.long), step)
    rows, counts = stats.distinct(0)
    assert rows.tolist() == [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]] and counts.tolist() == [40, 20]
    assert stats.num_questions(0) == 60 and stats.history(0).shape == (60, 3)


def test_batched_domains_cluster_as_if_alone():
    gen = torch.Generator().manual_seed(4)
    histories = [
        ((torch.rand(m, 5, generator=gen) * q).floor().sort(1).values, None)
        for m, q in [(40, 3), (7, 2), (90, 9)]
    ]
    together = cluster_histories(histories, k_max=6)
    tiny_budget = cluster_histories(histories, k_max=6, budget=1)  # every domain in its own batch
    for hist, a, b in zip(histories, together, tiny_budget):
        alone = cluster_history(hist[0], k_max=6)
        for fit in (a, b):
            assert fit.k == alone.k
            torch.testing.assert_close(fit.centroids, alone.centroids)
            torch.testing.assert_close(fit.inertias, alone.inertias)
