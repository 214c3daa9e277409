"""DRPO's state: per-domain histories of sorted question reward vectors, and their clustering.

A *question vector* is the ``n`` rewards of one prompt's rollouts, sorted ascending (ALGORITHMS.md section 2,
step 1: sorting makes everything downstream independent of rollout order). :class:`DomainStats` keeps them
per domain over a window of steps and clusters each domain's history with an elbow-chosen, seeded K-means
(:func:`cluster_history`), cached until that domain's history changes.

Cost. Histories are stored as distinct rows with counts, and K-means runs on the distinct rows weighted by
their counts (the same objective as clustering every row, and independent of row order). With
binary-like rewards and n = 5 rollouts a domain has at most a few dozen distinct rows whatever the window,
so even ``window="cumulative"`` stays cheap. With continuous rewards (an IoU term) almost every row is
distinct: with ``"cumulative"`` every step re-fits K-means (all k = 2..k_max) on every question seen so
far, and the time grows linearly with training length. The default ``window=50`` steps bounds it (see
``benchmarks/drpo_cost.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Window = int | Literal["cumulative", "batch"]


@dataclass(frozen=True)
class DomainClusters:
    """The clustering of one domain's history.

    Attributes:
        centroids: ``[k, n]`` float64 cluster centres (mean sorted reward vectors).
        sizes: ``[k]`` float64 number of history questions in each cluster (N_c), all > 0.
        inertias: ``[k_fitted]`` float64 K-means inertia for k = 1..k_fitted (diagnostics of the elbow).
        num_questions: N_d, questions in the domain's history.
        num_distinct: distinct rows in the history (caps k).
    """

    centroids: Tensor
    sizes: Tensor
    inertias: Tensor
    num_questions: int
    num_distinct: int

    @property
    def k(self) -> int:
        """The number of clusters chosen by the elbow rule."""
        return int(self.centroids.shape[0])

    @property
    def difficulty(self) -> Tensor:
        """``[k]`` m_c: the mean reward of each cluster (mean of its centroid)."""
        return self.centroids.mean(dim=1)

    def assign(self, vectors: Tensor) -> Tensor:
        """Index of the nearest centroid of each sorted question vector.

        Args:
            vectors: ``[Q, n]`` sorted reward vectors.

        Returns:
            ``[Q]`` long cluster indices (ties go to the lower index).
        """
        dist = torch.cdist(vectors.to(self.centroids), self.centroids)  # [Q, k]
        return dist.argmin(dim=1)


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch ops single-threaded for the duration (restoring the previous setting after).

    K-means here works on small tensors (a few thousand 5-vectors at most with the default window): too
    small to gain from intra-op threads, and when the cores are busy (rollout engine, other processes)
    the OpenMP hand-offs made the clustering 10-50x slower in measurements.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """``[B, U, k]`` squared distances between rows ``x [B, U, n]`` and centres ``c [B, k, n]``."""
    cross = torch.bmm(x, c.transpose(1, 2))  # [B, U, k]
    return (x.square().sum(-1)[..., None] - 2 * cross + c.square().sum(-1)[:, None, :]).clamp(min=0)


def _draw(p: Tensor, u: Tensor) -> Tensor:
    """Per row of ``p [B, U]`` (non-negative), an index drawn with probability ∝ p from ``u [B]``."""
    cdf = p.cumsum(1)  # [B, U]
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=p.shape[1] - 1)


def _kmeans_pp(xb: Tensor, wb: Tensor, draws: Tensor, k_top: int) -> Tensor:
    """k-means++ seeding of B weighted problems ``xb [B, U, n]``, ``wb [B, U]`` with uniform ``draws [B, K]``
    (draws beyond a problem's k are unused); returns the centres ``[B, K, n]``."""
    batch = len(xb)
    centres = xb[torch.arange(batch), _draw(wb, draws[:, 0])][:, None, :].repeat(1, k_top, 1)  # [B, K, n]
    d2 = _sq_dist(xb, centres[:, :1])[..., 0]  # [B, U]
    for j in range(1, k_top):
        p = wb * d2
        pick = _draw(torch.where(p.sum(1, keepdim=True) > 0, p, wb), draws[:, j])
        centres[:, j] = xb[torch.arange(batch), pick]
        d2 = torch.minimum(d2, _sq_dist(xb, centres[:, j : j + 1])[..., 0])
    return centres


def _lloyd(xb: Tensor, wb: Tensor, centres: Tensor, valid: Tensor, threshold: Tensor, max_iter: int) -> None:
    """Lloyd iterations of B problems, each until its labels stop changing or its centres move less than its
    ``threshold``; ``centres [B, K, n]`` are updated in place (``valid [B, K]``: its real centres)."""
    batch, u_top, n = xb.shape
    k_top = centres.shape[1]
    real = wb > 0  # [B, U] rows that are not padding
    wxb = wb[..., None] * xb  # [B, U, n]
    active = torch.arange(batch)
    labels = torch.full((batch, u_top), -1)
    for _ in range(max_iter):
        a = len(active)
        c, x_a, w_a = centres[active], xb[active], wb[active]  # [A, K, n], [A, U, n], [A, U]
        new_labels = _sq_dist(x_a, c).masked_fill(~valid[active, None, :], torch.inf).argmin(-1)  # [A, U]
        flat = (new_labels + (torch.arange(a) * k_top)[:, None]).flatten()  # [A*U]
        mass = torch.zeros(a * k_top, dtype=torch.float64).index_add_(0, flat, w_a.flatten()).view(a, k_top)
        sums = torch.zeros(a * k_top, n, dtype=torch.float64).index_add_(0, flat, wxb[active].reshape(-1, n))
        updated = torch.where(mass[..., None] > 0, sums.view_as(c) / mass.clamp(min=1e-300)[..., None], c)
        same = ((new_labels == labels[active]) | ~real[active]).all(1)
        go_on = ~same & ((updated - c).square().sum((1, 2)) > threshold[active])
        centres[active], labels[active] = updated, new_labels
        active = active[go_on]
        if len(active) == 0:
            break


def _kmeans_torch(
    xs: list[Tensor],
    ws: list[Tensor],
    ks: list[list[int]],
    n_init: int,
    seed: int,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> list[dict[int, tuple[Tensor, Tensor, float]]]:
    """Weighted K-means of several domains and several k at once: k-means++ seeding, Lloyd iterations.

    Every (domain, k, restart) is one problem of a batch (rows padded with weight 0, centres padded and
    masked), so a whole step's clustering is a few dozen tensor ops rather than hundreds of tiny fits. Each
    problem stops on its own when its labels stop changing or its centres move less than ``tol`` times
    its domain's mean per-feature variance (scikit-learn's criteria); the best of ``n_init`` restarts is
    kept. A domain's random draws come from its own generator seeded with ``seed``, so its result does not
    depend on which other domains share the batch.

    Args:
        xs: per domain, distinct rows ``[U_d, n]`` (float64).
        ws: per domain, row weights ``[U_d]``.
        ks: per domain, the numbers of clusters to fit (each <= U_d).
        n_init: restarts per (domain, k).
        seed: random state.
        max_iter: Lloyd iteration cap.
        tol: relative centre-shift tolerance.

    Returns:
        Per domain, k -> (centres ``[k, n]``, labels ``[U_d]``, weighted inertia).
    """
    u_top, n = max(len(x) for x in xs), xs[0].shape[1]
    k_top = max(max(k) for k in ks)
    x_pad = torch.zeros(len(xs), u_top, n, dtype=torch.float64)  # [D, U, n]
    w_pad = torch.zeros(len(xs), u_top, dtype=torch.float64)  # [D, U]
    draws, dom, k_list = [], [], []
    for d, (x, w, k_d) in enumerate(zip(xs, ws, ks)):
        x_pad[d, : len(x)], w_pad[d, : len(x)] = x, w
        gen = torch.Generator().manual_seed(seed)
        u = torch.rand(len(k_d) * n_init, max(k_d), dtype=torch.float64, generator=gen)
        draws.append(torch.nn.functional.pad(u, (0, k_top - max(k_d)), value=0.5))
        dom += [d] * (len(k_d) * n_init)
        k_list += [k for k in k_d for _ in range(n_init)]
    dom_t, draws_t = torch.tensor(dom), torch.cat(draws)  # [B], [B, K]
    xb, wb = x_pad[dom_t], w_pad[dom_t]  # [B, U, n], [B, U]
    batch = len(dom)
    valid = torch.arange(k_top)[None, :] < torch.tensor(k_list)[:, None]  # [B, K] real centres
    centres = _kmeans_pp(xb, wb, draws_t, k_top)  # [B, K, n]
    mean = (w_pad[..., None] * x_pad).sum(1) / w_pad.sum(1, keepdim=True)  # [D, n]
    var = (w_pad[..., None] * (x_pad - mean[:, None]) ** 2).sum(1) / w_pad.sum(1, keepdim=True)  # [D, n]
    threshold = (tol * var.mean(1))[dom_t]  # [B]
    _lloyd(xb, wb, centres, valid, threshold, max_iter)
    best_d, labels = _sq_dist(xb, centres).masked_fill(~valid[:, None, :], torch.inf).min(-1)  # [B, U]
    inertia = (best_d * wb).sum(1)  # [B]
    out: list[dict[int, tuple[Tensor, Tensor, float]]] = [{} for _ in xs]
    for b0 in range(0, batch, n_init):  # the restarts of one (domain, k) are consecutive
        b = b0 + int(inertia[b0 : b0 + n_init].argmin())
        d, k = dom[b], k_list[b]
        out[d][k] = (centres[b, :k].clone(), labels[b, : len(xs[d])].clone(), float(inertia[b]))
    return out


def _kmeans_sklearn(
    xs: list[Tensor], ws: list[Tensor], ks: list[list[int]], n_init: int, seed: int
) -> list[dict[int, tuple[Tensor, Tensor, float]]]:
    """scikit-learn's weighted K-means, one fit per (domain, k) (about 20 ms of fixed overhead per fit)."""
    from sklearn.cluster import KMeans  # heavy import, only when asked for

    out: list[dict[int, tuple[Tensor, Tensor, float]]] = []
    for x, w, k_d in zip(xs, ws, ks):
        fits = {}
        for k in k_d:
            km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(
                x.numpy(), sample_weight=w.numpy()
            )
            fits[k] = (
                torch.from_numpy(km.cluster_centers_).double(),
                torch.from_numpy(km.labels_).long(),
                float(km.inertia_),
            )
        out.append(fits)
    return out


def unique_rows(rows: Tensor, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Distinct rows in lexicographic order, with their summed multiplicities.

    (``torch.unique(dim=0)`` took ~0.3 s on 22k rows here; a numpy lexsort takes a few ms.)

    Args:
        rows: ``[M, n]`` rows.
        counts: ``[M]`` multiplicity of each row (default 1 each).

    Returns:
        ``rows [U, n]`` (dtype of the input) and ``counts [U]`` long.
    """
    a = rows.detach().cpu().numpy()
    if a.shape[0] == 0:
        return rows.detach().cpu().clone(), torch.zeros(0, dtype=torch.long)
    order = np.lexsort(a.T[::-1])  # by column 0, then 1, ...
    ordered = a[order]
    first = np.ones(len(ordered), dtype=bool)
    first[1:] = (ordered[1:] != ordered[:-1]).any(axis=1)
    weights = None if counts is None else counts.detach().cpu().numpy()[order].astype(np.float64)
    summed = np.bincount(np.cumsum(first) - 1, weights=weights)
    return torch.from_numpy(ordered[first].copy()), torch.from_numpy(np.rint(summed).astype(np.int64))


def cluster_history(
    rows: Tensor,
    k_max: int = 10,
    tau: float = 0.1,
    seed: int = 0,
    n_init: int = 3,
    backend: Literal["torch", "sklearn"] = "torch",
    counts: Tensor | None = None,
) -> DomainClusters:
    """Cluster a domain's question vectors with K-means, choosing k by the elbow rule.

    The rows are reduced to their distinct values weighted by multiplicity (same objective as clustering
    every row; the result does not depend on row order). With k_cap = min(k_max, distinct rows), k = 1..k_cap
    are fitted; with inertia drops D_j = I_j - I_(j+1), the chosen k is the first j >= 2 with
    D_j < tau * D_(j-1), else k_cap. k = 1 is exact (the weighted mean); k >= 2 is a seeded
    k-means++ / Lloyd K-means with ``n_init`` restarts, deterministic.

    Args:
        rows: ``[M, n]`` sorted question vectors, M >= 1.
        k_max: largest number of clusters.
        tau: elbow threshold on the ratio of successive inertia drops.
        seed: K-means random state.
        n_init: K-means restarts per k.
        backend: ``"torch"`` (qoq's batched K-means, default) or ``"sklearn"`` (``sklearn.cluster.KMeans``,
            same algorithm, ~20 ms fixed overhead per fit).
        counts: ``[M]`` multiplicity of each row (default 1 each).

    Returns:
        The chosen clustering.
    """
    return cluster_histories([(rows, counts)], k_max, tau, seed, n_init, backend)[0]


def cluster_histories(
    histories: list[tuple[Tensor, Tensor | None]],
    k_max: int = 10,
    tau: float = 0.1,
    seed: int = 0,
    n_init: int = 3,
    backend: Literal["torch", "sklearn"] = "torch",
    budget: int = 1 << 18,
) -> list[DomainClusters]:
    """:func:`cluster_history` for several domains at once (one K-means batch while it fits ``budget``).

    Args:
        histories: per domain, ``(rows [M, n], counts [M] or None)``.
        k_max: largest number of clusters.
        tau: elbow threshold.
        seed: K-means random state.
        n_init: K-means restarts per k.
        backend: ``"torch"`` or ``"sklearn"``.
        budget: largest distance tensor (problems x rows x centres) of one torch batch. Small domains
            are grouped, smallest first, under it: batching pays where per-op overhead dominates, while
            large domains run alone (padding a batch to its largest member would waste work).

    Returns:
        One clustering per history, in order.
    """
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if backend not in ("torch", "sklearn"):
        raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
    for rows, _ in histories:
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise ValueError(f"clustering needs a non-empty [M, n] history, got shape {tuple(rows.shape)}")
    with single_threaded():
        distinct = [unique_rows(rows.detach().cpu().double(), counts) for rows, counts in histories]
        xs = [x for x, _ in distinct]
        ws = [c.double() for _, c in distinct]
        ks = [list(range(2, min(k_max, len(x)) + 1)) for x in xs]
        fits: list[dict[int, tuple[Tensor, Tensor, float]]] = [{} for _ in xs]
        todo = sorted((i for i in range(len(xs)) if ks[i]), key=lambda i: len(xs[i]))
        kmeans = _kmeans_torch if backend == "torch" else _kmeans_sklearn
        per_domain = n_init * (k_max - 1) * k_max  # (problems x centres) of one domain, at most
        while todo:  # smallest first, so a group's padded size is its last member's
            group = [todo.pop(0)]
            while todo and (len(group) + 1) * len(xs[todo[0]]) * per_domain <= budget:
                group.append(todo.pop(0))
            batch = kmeans(
                [xs[i] for i in group], [ws[i] for i in group], [ks[i] for i in group], n_init, seed
            )
            for i, fit in zip(group, batch):
                fits[i] = fit
        return [_elbow(x, w, fit, tau) for x, w, fit in zip(xs, ws, fits)]


def _elbow(x: Tensor, w: Tensor, fits: dict[int, tuple[Tensor, Tensor, float]], tau: float) -> DomainClusters:
    """Choose k by the elbow rule among the K-means fits (k = 1, the weighted mean, added here)."""
    mean = (w[:, None] * x).sum(0, keepdim=True) / w.sum()  # [1, n]
    one = (mean, torch.zeros(len(x), dtype=torch.long), float((w * (x - mean).square().sum(1)).sum()))
    fits = {1: one, **fits}
    k_cap = len(fits)
    inertias = [fits[k][2] for k in range(1, k_cap + 1)]
    chosen = k_cap
    for j in range(2, k_cap):  # D_j = I_j - I_(j+1), with I_1 at index 0
        if inertias[j - 1] - inertias[j] < tau * (inertias[j - 2] - inertias[j - 1]):
            chosen = j
            break
    centres, labels, _ = fits[chosen]
    sizes = torch.zeros(len(centres), dtype=torch.float64).index_add_(0, labels, w)  # [k]
    keep = sizes > 0  # K-means may, rarely, leave a centre without members
    return DomainClusters(
        centroids=centres[keep].contiguous(),
        sizes=sizes[keep],
        inertias=torch.tensor(inertias, dtype=torch.float64),
        num_questions=int(w.sum()),
        num_distinct=int(x.shape[0]),
    )


class DomainStats:
    """Per-domain history of sorted question reward vectors, with cached clustering.

    Each domain's history is a deque of ``(step, rows [u, n], counts [u])`` blocks: a step's distinct
    vectors and how many questions had each (reward vectors repeat a lot, so this is compact). ``window``
    decides what stays: ``"cumulative"`` keeps everything (merged into one block, so a push costs
    O(distinct rows), not O(history)), an int W keeps the blocks of the last W steps (steps t-W+1..t after
    a push at step t), ``"batch"`` keeps only the latest step (W = 1). Clusterings are cached per domain
    and re-fitted only when that domain's history changed.

    Args:
        window: ``"cumulative"``, ``"batch"`` or a number of steps.
        k_max: largest number of K-means clusters per domain (1 turns the cluster factor into a domain mean).
        tau: elbow threshold (see :func:`cluster_history`).
        seed: K-means random state.
        n_init: K-means restarts per k.
        backend: K-means implementation, ``"torch"`` or ``"sklearn"`` (see :func:`cluster_history`).
    """

    def __init__(
        self,
        window: Window = 50,
        k_max: int = 10,
        tau: float = 0.1,
        seed: int = 0,
        n_init: int = 3,
        backend: Literal["torch", "sklearn"] = "torch",
    ):
        if isinstance(window, str) and window not in ("cumulative", "batch"):
            raise ValueError(f"window must be 'cumulative', 'batch' or an int >= 1, got {window!r}")
        if not isinstance(window, str) and (isinstance(window, bool) or int(window) != window or window < 1):
            raise ValueError(f"window must be 'cumulative', 'batch' or an int >= 1, got {window!r}")
        if k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        if backend not in ("torch", "sklearn"):
            raise ValueError(f"backend must be 'torch' or 'sklearn', got {backend!r}")
        self.window: Window = window if isinstance(window, str) else int(window)
        self.k_max, self.tau, self.seed, self.n_init = int(k_max), float(tau), int(seed), int(n_init)
        self.backend = backend
        self.step = -1  # last pushed step
        self._blocks: dict[int, deque[tuple[int, Tensor, Tensor]]] = {}  # domain -> (step, rows, counts)
        self._version: dict[int, int] = {}
        self._cache: dict[int, tuple[int, DomainClusters]] = {}

    # ------------------------------------------------------------------ history
    @property
    def domains(self) -> list[int]:
        """Domains with a non-empty history, ascending."""
        return sorted(self._blocks)

    @property
    def width(self) -> int | None:
        """n, the length of the stored vectors (None while empty)."""
        for blocks in self._blocks.values():
            return int(blocks[0][1].shape[1])
        return None

    def distinct(self, domain: int) -> tuple[Tensor, Tensor]:
        """``domain``'s history in the window: distinct rows ``[U, n]`` (lexicographic), counts ``[U]``."""
        blocks = self._blocks.get(int(domain))
        if not blocks:
            return torch.empty(0, self.width or 0), torch.zeros(0, dtype=torch.long)
        if len(blocks) == 1:
            return blocks[0][1], blocks[0][2]
        return unique_rows(torch.cat([b[1] for b in blocks]), torch.cat([b[2] for b in blocks]))

    def history(self, domain: int) -> Tensor:
        """``[M_d, n]`` float32 sorted question vectors of ``domain`` in the window, as a multiset
        (rows in lexicographic order, each repeated as often as it was seen)."""
        rows, counts = self.distinct(domain)
        return rows.repeat_interleave(counts, dim=0)

    def num_questions(self, domain: int | None = None) -> int:
        """Questions in the window for ``domain`` (all domains when None)."""
        keys = self.domains if domain is None else [int(domain)] if int(domain) in self._blocks else []
        return sum(int(b[2].sum()) for d in keys for b in self._blocks[d])

    def push(self, vectors: Tensor, domain_ids: Tensor, step: int | None = None) -> None:
        """Add one step's question vectors (sorted here), then drop what left the window.

        Args:
            vectors: ``[Q, n]`` reward vectors, one row per question (any rollout order).
            domain_ids: ``[Q]`` domain index of each question.
            step: the optimizer/rollout step, non-decreasing; default the last step + 1.
        """
        if vectors.ndim != 2 or domain_ids.shape != (vectors.shape[0],):
            raise ValueError(
                f"push expects vectors [Q, n] and domain_ids [Q]; got {tuple(vectors.shape)} and "
                f"{tuple(domain_ids.shape)}"
            )
        width = self.width
        if width is not None and vectors.shape[1] != width:
            raise ValueError(
                f"push: vectors have {vectors.shape[1]} rollouts per question, history has {width}"
            )
        step = self.step + 1 if step is None else int(step)
        if step < self.step:
            raise ValueError(f"push: step {step} is before the last pushed step {self.step}")
        self.step = step
        rows = vectors.detach().to("cpu", torch.float32).sort(dim=1).values + 0.0  # [Q, n]; -0.0 -> 0.0
        domains = domain_ids.detach().cpu().long()  # [Q]
        for d in domains.unique().tolist():
            self._append(d, step, *unique_rows(rows[domains == d]))
        self._evict()

    def _append(self, domain: int, step: int, rows: Tensor, counts: Tensor) -> None:
        blocks = self._blocks.setdefault(domain, deque())
        if self.window == "cumulative" and blocks:  # steps no longer matter: keep one block
            _, old_rows, old_counts = blocks.pop()
            rows, counts = unique_rows(torch.cat([old_rows, rows]), torch.cat([old_counts, counts]))
        blocks.append((step, rows, counts))
        self._touch(domain)

    def _evict(self) -> None:
        if self.window == "cumulative":
            return
        span = 1 if self.window == "batch" else self.window
        for d in list(self._blocks):
            blocks = self._blocks[d]
            changed = False
            while blocks and blocks[0][0] <= self.step - span:
                blocks.popleft()
                changed = True
            if changed:
                self._touch(d)
            if not blocks:
                del self._blocks[d]

    def _touch(self, domain: int) -> None:
        self._version[domain] = self._version.get(domain, 0) + 1

    # ------------------------------------------------------------------ clustering
    def clusters(self, domain: int) -> DomainClusters:
        """The (cached) elbow-chosen K-means clustering of ``domain``'s history."""
        return self.clusters_many([domain])[int(domain)]

    def clusters_many(self, domains: Iterable[int]) -> dict[int, DomainClusters]:
        """The clusterings of several domains; those whose history changed are re-fitted in one batch.

        Args:
            domains: domain ids, each with a history.

        Returns:
            domain -> clustering.
        """
        domains = sorted({int(d) for d in domains})
        missing = [d for d in domains if d not in self._blocks]
        if missing:
            raise KeyError(f"domains {missing} have no history (domains with history: {self.domains})")
        stale = [d for d in domains if self._cache.get(d, (None,))[0] != self._version[d]]
        if stale:
            fits = cluster_histories(
                [self.distinct(d) for d in stale], self.k_max, self.tau, self.seed, self.n_init, self.backend
            )
            for d, fit in zip(stale, fits):
                self._cache[d] = (self._version[d], fit)
        return {d: self._cache[d][1] for d in domains}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain state (tensors, ints, floats, strings, lists): loads with ``torch.load(weights_only=True)``.

        The clustering cache is not saved: it is a deterministic function of the history.
        """
        blocks = [(d, *b) for d in self.domains for b in self._blocks[d]]
        return {
            "window": str(self.window),
            "k_max": self.k_max,
            "tau": self.tau,
            "seed": self.seed,
            "n_init": self.n_init,
            "step": self.step,
            "block_domains": [b[0] for b in blocks],
            "block_steps": [b[1] for b in blocks],
            "block_rows": [b[2].clone() for b in blocks],
            "block_counts": [b[3].clone() for b in blocks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the history saved by :meth:`state_dict`.

        The constructor's settings (window, k_max, tau, seed) stay in force: a resumed run with a smaller
        window drops the blocks that fall outside it.
        """
        self.step = int(state["step"])
        self._blocks, self._cache = {}, {}
        blocks = zip(state["block_domains"], state["block_steps"], state["block_rows"], state["block_counts"])
        for d, step, rows, counts in blocks:
            self._append(int(d), int(step), rows.to("cpu", torch.float32), counts.to("cpu", torch.long))
        self._evict()

    def merge(self, others: Iterable[DomainStats]) -> None:
        """Fold in the statistics other data-parallel ranks gathered over the same steps.

        Blocks of the same domain and step are combined, so merging ranks that each pushed their part of a
        batch gives exactly the stats of pushing the whole batch.

        Args:
            others: stats with the same window and vector width.
        """
        others = list(others)
        for other in others:
            if str(other.window) != str(self.window):
                raise ValueError(f"merge: window {other.window!r} differs from {self.window!r}")
            if None not in (self.width, other.width) and self.width != other.width:
                raise ValueError(f"merge: vector width {other.width} differs from {self.width}")
        self.step = max([self.step] + [o.step for o in others])
        for d in sorted({d for s in [self, *others] for d in s._blocks}):
            by_step: dict[int, list[tuple[Tensor, Tensor]]] = {}
            for stats in [self, *others]:
                for step, rows, counts in stats._blocks.get(d, ()):
                    by_step.setdefault(step, []).append((rows, counts))
            self._blocks[d] = deque()
            for step in sorted(by_step):
                parts = by_step[step]
                merged = unique_rows(torch.cat([r for r, _ in parts]), torch.cat([c for _, c in parts]))
                self._append(d, step, *merged)
        self._evict()

    def __repr__(self) -> str:
        sizes = {d: self.num_questions(d) for d in self.domains}
        return f"DomainStats(window={self.window!r}, k_max={self.k_max}, step={self.step}, questions={sizes})"
