"""Adaptive domain sampling: move the training mixture toward the domains that need it.

DRPO and its kin rebalance domains by *scaling* advantages; this module rebalances them by *sampling*:
:class:`AdaptiveDomainSampler` turns per-domain statistics reported after each RL step (share of
zero-variance groups, mean reward) into domain sampling probabilities, in the spirit of MT-GRPO's task
sampler and of GDRO's prompt reweighting (multiplicative weights on a per-group "need" score, Panaganti
et al. 2025): domains whose groups all score alike (no learning signal) or whose reward is low get
sampled more, and a floor keeps every domain in the mix. :func:`allocate_group_sizes` spends a fixed
rollout budget unevenly over a batch's prompts, more rollouts to harder prompts (in the spirit of GDRO's
rollout reallocation).

Pure logic on Python floats: no Lightning, no tensors; the state is a small dict for checkpoints. How it
plugs in (``sampler: adaptive`` of :class:`qoq.data.ClinicalDataModule`, settings :class:`AdaptiveSampling`):
after each RL step :class:`qoq.systems.PolicyOptimization` publishes
:func:`qoq.rl.groups.domain_batch_stats` of every group it generated (keyed by domain name),
:class:`qoq.callbacks.DomainStatsFeedback` hands them to the data module, whose :class:`AdaptiveSchedule`
folds them into the sampler and decides which probabilities each stream batch is drawn with (those after
the report of batch ``b - lag``); the schedule is saved with the stream position, so a resumed run draws
the same batches. :func:`allocate_group_sizes` is not wired into training (the rollout engines sample a
fixed ``n`` per prompt).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal


def _project_with_floor(q: list[float], floor: float) -> list[float]:
    """The distribution closest in shape to ``q`` (proportional off the floor) with every entry >= floor.

    Entries whose scaled share would fall below ``floor`` are fixed at ``floor``; the others share the rest
    in proportion to ``q``; repeated until no free entry falls below (at most len(q) rounds).
    """
    fixed = [False] * len(q)
    while True:
        free_mass = sum(v for v, f in zip(q, fixed) if not f)
        rest = 1.0 - floor * sum(fixed)
        p = [floor if f else rest * v / free_mass for v, f in zip(q, fixed)]
        low = [i for i, (v, f) in enumerate(zip(p, fixed)) if not f and v < floor]
        if not low:
            return p
        for i in low:
            fixed[i] = True


class AdaptiveDomainSampler:
    """Domain sampling probabilities that follow each domain's need for more samples.

    Per domain d it keeps exponential moving averages of two statistics reported each step: z_d, the
    share of its groups whose rewards were all equal (zero variance: no GRPO signal), and m_d, its mean
    reward (first report sets them; later ones: x = momentum * x + (1 - momentum) * new). Then

    1. need s_d = ``zero_var_weight`` * z_d + ``low_reward_weight`` * (hi - m_d) / (hi - lo), with
       (lo, hi) = ``reward_range`` and the reward term clipped to [0, 1]; a domain never reported takes the
       mean need of the reported ones (all 0 before the first report);
    2. q_d proportional to base_d * exp(``eta`` * s_d) (multiplicative weights on the base mixture);
    3. p = q projected onto {p_d >= ``floor``, sum p = 1}: domains below the floor are set to it and the
       rest share the remaining mass in proportion to q.

    Before any report p is the base mixture (lifted to the floor where needed). Everything is a
    deterministic function of the reports, so two runs with the same reports agree exactly.

    Args:
        domains: the domain names, in a fixed order.
        base: domain -> base weight (e.g. :attr:`MixtureSampler.weights`); None: uniform. Normalised.
        momentum: EMA factor in [0, 1) (0: only the latest report counts).
        zero_var_weight: weight of the zero-variance share in the need.
        low_reward_weight: weight of the (normalised) reward shortfall in the need.
        eta: strength of the tilt (0: the base mixture).
        floor: smallest probability of any domain; ``floor * len(domains) <= 1``.
        reward_range: (lo, hi) bounds of the mean reward.
    """

    STAT_KEYS = ("zero_var_frac", "mean_reward")

    def __init__(
        self,
        domains: Sequence[str],
        base: Mapping[str, float] | None = None,
        momentum: float = 0.9,
        zero_var_weight: float = 1.0,
        low_reward_weight: float = 1.0,
        eta: float = 2.0,
        floor: float = 0.02,
        reward_range: tuple[float, float] = (0.0, 1.0),
    ) -> None:
        self.domains = list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(
                f"AdaptiveDomainSampler: domains must be non-empty and distinct, got {self.domains}"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"AdaptiveDomainSampler: momentum must be in [0, 1), got {momentum}")
        if eta < 0 or zero_var_weight < 0 or low_reward_weight < 0:
            raise ValueError("AdaptiveDomainSampler: eta, zero_var_weight and low_reward_weight must be >= 0")
        if not 0.0 <= floor * len(self.domains) <= 1.0:
            raise ValueError(
                f"AdaptiveDomainSampler: floor {floor} x {len(self.domains)} domains must be in [0, 1]"
            )
        lo, hi = reward_range
        if not hi > lo:
            raise ValueError(
                f"AdaptiveDomainSampler: reward_range must be (lo, hi) with hi > lo, got {reward_range}"
            )
        base = {d: 1.0 for d in self.domains} if base is None else dict(base)
        if set(base) != set(self.domains):
            raise ValueError(
                f"AdaptiveDomainSampler: base covers {sorted(base)}, domains are {sorted(self.domains)}"
            )
        if any(not (math.isfinite(w) and w > 0) for w in base.values()):
            raise ValueError(f"AdaptiveDomainSampler: base weights must be finite and > 0, got {base}")
        total = sum(base.values())
        self.base = {d: base[d] / total for d in self.domains}
        self.momentum, self.eta, self.floor = momentum, eta, floor
        self.zero_var_weight, self.low_reward_weight = zero_var_weight, low_reward_weight
        self.reward_range = (float(lo), float(hi))
        self.zero_var: dict[str, float] = {}
        self.reward: dict[str, float] = {}
        self.updates = 0

    def update(self, domain_stats: Mapping[str, Mapping[str, float]]) -> None:
        """Fold one step's per-domain statistics into the running averages.

        Args:
            domain_stats: domain -> ``{"zero_var_frac": share in [0, 1] of its groups with equal rewards,
                "mean_reward": its mean reward}`` (other keys, e.g. ``groups``, are ignored), for the
                domains present in the step (see :func:`qoq.rl.groups.domain_batch_stats`; map its
                domain ids to names first). Absent domains keep their averages.
        """
        for domain, stats in domain_stats.items():
            if domain not in self.base:
                raise ValueError(
                    f"AdaptiveDomainSampler.update: unknown domain {domain!r}; known: {self.domains}"
                )
            missing = [k for k in self.STAT_KEYS if k not in stats]
            if missing:
                raise ValueError(f"AdaptiveDomainSampler.update: domain {domain!r} lacks {missing}")
            z, m = float(stats["zero_var_frac"]), float(stats["mean_reward"])
            if not (0.0 <= z <= 1.0 and math.isfinite(m)):
                raise ValueError(
                    f"AdaptiveDomainSampler.update: domain {domain!r}: zero_var_frac must be in [0, 1] and "
                    f"mean_reward finite, got {z}, {m}"
                )
        keep = self.momentum
        for domain, stats in domain_stats.items():
            for table, key in ((self.zero_var, "zero_var_frac"), (self.reward, "mean_reward")):
                new, old = float(stats[key]), table.get(domain)
                table[domain] = new if old is None else keep * old + (1 - keep) * new
        self.updates += 1

    def need(self) -> dict[str, float]:
        """Domain -> need s_d (step 1 of the class docstring)."""
        lo, hi = self.reward_range
        known = {
            d: self.zero_var_weight * self.zero_var[d]
            + self.low_reward_weight * min(max((hi - self.reward[d]) / (hi - lo), 0.0), 1.0)
            for d in self.domains
            if d in self.zero_var
        }
        neutral = sum(known.values()) / len(known) if known else 0.0
        return {d: known.get(d, neutral) for d in self.domains}

    def probabilities(self) -> dict[str, float]:
        """Domain -> sampling probability (sums to 1, each >= ``floor``), in :attr:`domains` order."""
        need = self.need()
        top = max(need.values())
        # shifted by the top need so exp cannot overflow (the normalisation cancels the shift)
        q = [self.base[d] * math.exp(self.eta * (need[d] - top)) for d in self.domains]
        total = sum(q)
        p = _project_with_floor([v / total for v in q], self.floor)
        return dict(zip(self.domains, p))

    def state_dict(self) -> dict[str, Any]:
        """The running averages and the number of updates (plain Python values)."""
        return {
            "domains": list(self.domains),
            "zero_var": dict(self.zero_var),
            "reward": dict(self.reward),
            "updates": self.updates,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the running averages; the checkpoint's domains must be this sampler's.

        Args:
            state: a dict from :meth:`state_dict`.
        """
        if list(state["domains"]) != self.domains:
            raise ValueError(
                f"AdaptiveDomainSampler.load_state_dict: checkpoint domains {list(state['domains'])} differ "
                f"from this sampler's {self.domains}"
            )
        self.zero_var = {str(d): float(v) for d, v in state["zero_var"].items()}
        self.reward = {str(d): float(v) for d, v in state["reward"].items()}
        self.updates = int(state["updates"])


@dataclass
class AdaptiveSampling:
    """Settings of the data modules' ``sampler: adaptive`` mode (an :class:`AdaptiveDomainSampler` fed by
    the RL system, scheduled by :class:`AdaptiveSchedule`).

    Args:
        base: the mixture the tilt starts from: ``natural``, ``balanced`` or ``temperature`` (with the data
            module's ``temperature``).
        momentum: EMA factor of the reported statistics in [0, 1).
        zero_var_weight: weight of a domain's share of zero-variance groups in its need.
        low_reward_weight: weight of a domain's (normalised) reward shortfall in its need.
        eta: strength of the tilt (0: the base mixture).
        floor: smallest sampling probability of any domain.
        reward_range: (lo, hi) bounds of the mean reward.
        lag: batch b of the stream is drawn with the probabilities after the report of batch b - lag. A
            batch's report arrives after its training step and Lightning prefetches one batch, so 2 is the
            smallest lag for which every batch is drawn the same way in a fresh and in a resumed run.
    """

    base: Literal["natural", "balanced", "temperature"] = "natural"
    momentum: float = 0.9
    zero_var_weight: float = 1.0
    low_reward_weight: float = 1.0
    eta: float = 2.0
    floor: float = 0.02
    reward_range: tuple[float, float] = (0.0, 1.0)
    lag: int = 2

    def sampler(self, domains: Sequence[str], base: Mapping[str, float] | None = None) -> AdaptiveDomainSampler:
        """A fresh :class:`AdaptiveDomainSampler` with these settings.

        Args:
            domains: the domain names, in the order probabilities are returned.
            base: domain -> base weight (the ``base`` mixture's probabilities); None: uniform.
        """
        return AdaptiveDomainSampler(
            domains,
            base=base,
            momentum=self.momentum,
            zero_var_weight=self.zero_var_weight,
            low_reward_weight=self.low_reward_weight,
            eta=self.eta,
            floor=self.floor,
            reward_range=tuple(self.reward_range),
        )


class AdaptiveSchedule:
    """Which domain probabilities each batch of a numbered stream is drawn with: reports in, probabilities out.

    Reports arrive keyed by the stream index of the batch they were measured on, in increasing order (one
    per training step). Batch ``b`` is drawn with the sampler's probabilities after every report of a batch
    ``<= b - lag`` (the initial probabilities when there is none). That makes the stream a pure function
    of the seed and the reports, however far ahead the loader runs, as long as it runs at most ``lag - 1``
    batches ahead of the reports; a batch whose probabilities are not known yet raises instead of being
    drawn from a guess. The probabilities after each of the last few reports are kept (and saved), so a
    resumed run draws its first batches exactly as the uninterrupted run did.

    Args:
        sampler: a fresh (never updated) :class:`AdaptiveDomainSampler`.
        lag: see above; >= 1.
        keep: probability snapshots kept (>= lag + 1).
    """

    def __init__(self, sampler: AdaptiveDomainSampler, lag: int = 2, keep: int = 8) -> None:
        if sampler.updates:
            raise ValueError("AdaptiveSchedule needs a fresh sampler (its initial probabilities start the stream)")
        if lag < 1 or keep < lag + 1:
            raise ValueError(f"AdaptiveSchedule: need lag >= 1 and keep >= lag + 1, got lag={lag}, keep={keep}")
        self.sampler, self.lag, self.keep = sampler, lag, keep
        self.initial = self._vector()
        self.last: int | None = None  # stream index of the last report
        self._indices: list[int] = []  # stream indices of the kept snapshots (increasing)
        self._snapshots: list[list[float]] = []  # probabilities after each of those reports
        self._pruned = False

    def _vector(self) -> list[float]:
        p = self.sampler.probabilities()
        return [p[d] for d in self.sampler.domains]

    def observe(self, stream_index: int, domain_stats: Mapping[str, Mapping[str, float]]) -> None:
        """Fold the statistics measured on batch ``stream_index`` into the sampler.

        Args:
            stream_index: the batch's position in the stream; larger than every earlier report's.
            domain_stats: domain name -> ``{"zero_var_frac", "mean_reward"}`` (see
                :meth:`AdaptiveDomainSampler.update`).
        """
        if self.last is not None and stream_index <= self.last:
            raise ValueError(
                f"AdaptiveSchedule: report for batch {stream_index} after the report for batch {self.last}"
            )
        self.sampler.update(domain_stats)
        self.last = stream_index
        self._indices.append(stream_index)
        self._snapshots.append(self._vector())
        if len(self._indices) > self.keep:
            del self._indices[0], self._snapshots[0]
            self._pruned = True

    def probabilities(self, stream_index: int) -> list[float]:
        """Probabilities (in :attr:`AdaptiveDomainSampler.domains` order) to draw batch ``stream_index`` with.

        Raises:
            RuntimeError: if a report that would count for this batch may still come (the loader runs
                more than ``lag - 1`` batches ahead of the training step, or nothing reports at all), or
                if the batch is older than the kept snapshots.
        """
        upto = stream_index - self.lag
        if upto < 0:
            return list(self.initial)
        if self.last is None or self.last < upto:
            raise RuntimeError(
                f"adaptive sampling: batch {stream_index} is drawn with the domain statistics of batch {upto}, "
                f"which were not reported (last report: {self.last}). The RL system reports them after each "
                "training step (qoq.systems.PolicyOptimization does, through qoq.callbacks.DomainStatsFeedback); "
                "other modules, or loaders prefetching more than lag - 1 batches, cannot use `sampler: adaptive`"
            )
        pos = bisect.bisect_right(self._indices, upto)
        if pos == 0:
            if self._pruned:
                raise RuntimeError(f"adaptive sampling: batch {stream_index} is older than the kept snapshots")
            return list(self.initial)
        return list(self._snapshots[pos - 1])

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state, the last report's index and the kept snapshots (plain Python values)."""
        return {
            "sampler": self.sampler.state_dict(),
            "lag": self.lag,
            "last": self.last,
            "indices": list(self._indices),
            "snapshots": [list(p) for p in self._snapshots],
            "pruned": self._pruned,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue where a saved schedule stopped.

        Args:
            state: a dict from :meth:`state_dict`.

        Raises:
            ValueError: if the saved lag differs (batches would be drawn differently).
        """
        if int(state["lag"]) != self.lag:
            raise ValueError(f"AdaptiveSchedule: the checkpoint used lag {state['lag']}, this run has {self.lag}")
        self.sampler.load_state_dict(state["sampler"])
        self.last = None if state["last"] is None else int(state["last"])
        self._indices = [int(i) for i in state["indices"]]
        self._snapshots = [[float(v) for v in p] for p in state["snapshots"]]
        self._pruned = bool(state["pruned"])


def allocate_group_sizes(difficulty: Sequence[float], budget: int, n_min: int, n_max: int) -> list[int]:
    """Rollouts per prompt under a fixed budget, more for harder prompts.

    Every prompt gets ``n_min``; the ``budget - P * n_min`` extra rollouts are shared in proportion to
    ``difficulty`` (all equal when every difficulty is 0), capped at ``n_max`` per prompt (a capped
    prompt's excess is re-shared among the others), and rounded by largest remainder (ties to the lower
    index). Deterministic; the sizes sum to ``budget`` exactly.

    Note: DRPO needs equal group sizes; GRPO and the reweighting estimators of :mod:`qoq.rl.advantages` do not.

    Args:
        difficulty: ``P`` non-negative difficulties, e.g. 1 - the prompt's last mean reward.
        budget: total rollouts, ``P * n_min <= budget <= P * n_max``.
        n_min: fewest rollouts per prompt (>= 1; >= 2 for a group-relative signal).
        n_max: most rollouts per prompt.

    Returns:
        ``P`` group sizes.
    """
    d = [float(x) for x in difficulty]
    count = len(d)
    if count == 0:
        raise ValueError("allocate_group_sizes: no prompts")
    if not 1 <= n_min <= n_max:
        raise ValueError(f"allocate_group_sizes: need 1 <= n_min <= n_max, got {n_min}, {n_max}")
    if not count * n_min <= budget <= count * n_max:
        raise ValueError(
            f"allocate_group_sizes: budget {budget} outside [{count * n_min}, {count * n_max}] "
            f"for {count} prompts"
        )
    if any(not (math.isfinite(x) and x >= 0) for x in d):
        raise ValueError(f"allocate_group_sizes: difficulties must be finite and >= 0, got {d}")
    sizes = [n_min] * count
    remaining = budget - count * n_min
    active = [i for i in range(count)]
    while remaining > 0:
        weights = [d[i] for i in active]
        if sum(weights) == 0:
            weights = [1.0] * len(active)
        total = sum(weights)
        ideal = {i: remaining * w / total for i, w in zip(active, weights)}
        capped = [i for i in active if ideal[i] >= n_max - sizes[i]]
        if capped:  # give the capped prompts their maximum, re-share the rest
            for i in capped:
                remaining -= n_max - sizes[i]
                sizes[i] = n_max
            active = [i for i in active if i not in capped]
            continue
        floors = {i: math.floor(ideal[i]) for i in active}
        leftover = remaining - sum(floors.values())
        by_fraction = sorted(active, key=lambda i: (-(ideal[i] - floors[i]), i))
        for i in active:
            sizes[i] += floors[i]
        for i in by_fraction[:leftover]:
            sizes[i] += 1
        remaining = 0
    return sizes
