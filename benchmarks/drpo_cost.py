"""DRPO's cost per step against history length: ``window="cumulative"`` vs the default 50-step window.

For each history length (questions already in the history, spread over 9 domains with an imbalanced mix,
5 rollouts per question) the script times one :class:`qoq.rl.advantages.DRPO` step (push + clustering +
advantages) on a fresh batch, for binary-like rewards (accuracy and format only: few distinct question
vectors) and continuous rewards (with an IoU term: nearly every vector distinct), and prints the time as
a share of a reference RL step (0.6 s: a tiny CPU GRPO step, docs ENVIRONMENT.md). Wall time and this
process's CPU time are both reported; shares and ratios use the CPU time, the steadier number on a shared
machine (DRPO runs single-threaded, so on an idle one the two agree). It prints numbers and ratios; it
never asserts timings.

    python -m benchmarks.drpo_cost [--smoke] [--out results.json] [--step-seconds 0.6] [--prompts 8 512]
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from benchmarks import common
from qoq.rl.advantages import DRPO, AdvantageInputs

HISTORIES = [1_000, 5_000, 20_000, 50_000, 100_000, 200_000]
DOMAIN_MIX = torch.tensor([0.30, 0.20, 0.12, 0.10, 0.08, 0.07, 0.06, 0.04, 0.03])  # 9 domains, imbalanced


def _batch(prompts: int, rollouts: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``[prompts * rollouts]`` and per-question domains ``[prompts]``."""
    domains = torch.multinomial(DOMAIN_MIX, prompts, replacement=True, generator=gen)  # [P]
    p_correct = torch.rand(prompts, 1, generator=gen)  # question difficulty
    acc = (torch.rand(prompts, rollouts, generator=gen) < p_correct).float()  # [P, n]
    fmt = (torch.rand(prompts, rollouts, generator=gen) < 0.9).float()
    if kind == "binary":
        rewards = 0.75 * acc + 0.25 * fmt  # no region: IoU weight renormalised away
    else:
        rewards = 0.6 * acc + 0.2 * torch.rand(prompts, rollouts, generator=gen) + 0.2 * fmt
    return rewards.flatten(), domains


def time_drpo(
    window: int | str, history: int, prompts: int, kind: str, reps: int, rollouts: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Median seconds of one DRPO step with ``history`` questions already seen (at most ~10 s of reps)."""
    gen = torch.Generator().manual_seed(seed)
    est = DRPO(window=window, kl_damping=False, seed=seed)
    stats = est.stats
    if window == "cumulative":
        rewards, domains = _batch(history, rollouts, kind, gen)
        stats.push(rewards.view(history, rollouts), domains, step=0)
    else:  # only the last `window` steps can matter
        steps = min(int(window), max(1, history // prompts))
        for step in range(steps):
            rewards, domains = _batch(prompts, rollouts, kind, gen)
            stats.push(rewards.view(prompts, rollouts), domains, step=step)
    kept = stats.num_questions()
    group_ids = torch.arange(prompts).repeat_interleave(rollouts)
    times, cpu = [], []
    for _ in range(reps):
        rewards, domains = _batch(prompts, rollouts, kind, gen)
        t0, c0 = time.perf_counter(), time.process_time()
        est(AdvantageInputs(rewards, group_ids, domains.repeat_interleave(rollouts)))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if sum(times) > 10.0:  # slow configurations: fewer repetitions
            break
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpu), "history_kept": kept}


def run(
    smoke: bool = False,
    step_seconds: float = 0.6,
    prompts: list[int] | None = None,
    histories: list[int] | None = None,
    reps: int = 3,
) -> dict[str, Any]:
    """Run the benchmark and return its results (``smoke``: one short configuration).

    Args:
        smoke: a single small history, one repetition.
        step_seconds: reference RL step time for the share column.
        prompts: batch sizes (prompts per step) to time.
        histories: history lengths (questions) to time.
        reps: repetitions per configuration (median reported).
    """
    prompts = [8] if smoke else (prompts or [8])
    histories = [1_000] if smoke else (histories or HISTORIES)
    reps = 1 if smoke else reps
    rows = []
    for p in prompts:
        for kind in ("binary", "continuous"):
            for h in histories:
                row: dict[str, Any] = {"prompts": p, "rewards": kind, "history": h}
                for window in ("cumulative", 50):
                    res = time_drpo(window, h, p, kind, reps)
                    key = "cumulative" if window == "cumulative" else "window50"
                    row[f"{key}_s"] = res["seconds"]
                    row[f"{key}_cpu_s"] = res["cpu_seconds"]
                    row[f"{key}_kept"] = res["history_kept"]
                    row[f"{key}_share"] = res["cpu_seconds"] / step_seconds
                row["ratio"] = row["cumulative_cpu_s"] / row["window50_cpu_s"]
                rows.append(row)
                print(
                    f"P={p:4d} {kind:10s} history={h:7d} "
                    f"| cumulative: cpu {row['cumulative_cpu_s'] * 1e3:8.1f} ms"
                    f" (wall {row['cumulative_s'] * 1e3:8.1f}) = {row['cumulative_share']:7.2%} of a step "
                    f"| window=50 ({row['window50_kept']:5d} kept): cpu {row['window50_cpu_s'] * 1e3:7.1f} ms"
                    f" (wall {row['window50_s'] * 1e3:7.1f}) = {row['window50_share']:6.2%} "
                    f"| cumulative / window {row['ratio']:6.1f}x",
                    flush=True,
                )
    return {
        "step_seconds": step_seconds,
        "rollouts": 5,
        "domains": len(DOMAIN_MIX),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def main() -> None:
    """Command-line entry point."""
    parser = common.command_line(__doc__.splitlines()[0], "one short configuration")
    parser.add_argument("--step-seconds", type=float, default=0.6, help="reference RL step time (s)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[8], help="prompts per step")
    parser.add_argument("--histories", type=int, nargs="+", default=HISTORIES, help="history lengths")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (median)")
    args = parser.parse_args()
    results = run(args.smoke, args.step_seconds, args.prompts, args.histories, args.reps)
    if args.out:
        common.write_json(args.out, results)


if __name__ == "__main__":
    main()
