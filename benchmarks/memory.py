"""Peak memory of each phase of an RL step against batch size, response length and token budget.

One GRPO step of :class:`qoq.systems.PolicyOptimization` (a text-only TinyLM policy, HF rollouts that
never stop early, so every response has exactly ``max_new_tokens`` tokens) is split into its phases:

- ``rollout``: ``RolloutEngine.generate`` (KV cache of ``P * n`` rows),
- ``logprobs``: the no-grad old / reference log-prob passes (the prompts once plus ``[N, R]`` response
  activations on their shared KV cache, ``[N, R, V]`` logits). The old-log-prob pass is forced
  (``old_logprobs="forward"``) so that this phase is measured: by default an on-policy step without a KL
  reference skips it (the gradient pass gives the old log-probs), but it runs for later mini-batches
  and, with a KL term, for the reference,
- ``update``: the forward + backward passes and the optimizer step; ``token_budget`` bounds the rows per
  backward pass.

On CPU the figure is the growth of the process's resident memory (RSS) during the phase, above what it
held when the phase began (freed heap is returned to the system first, ``malloc_trim``, and RSS is
sampled every millisecond, so short spikes can be missed); on a GPU it is ``torch.cuda.max_memory_allocated``
above the allocation at the phase start. The last of ``steps`` steps is reported (the first warms up).

    python -m benchmarks.memory            # the full grid (a ~5M-parameter policy), ~3-5 minutes on 2 cores
    python -m benchmarks.memory --smoke    # one tiny configuration per setting (~30 s); figures not meaningful
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from typing_extensions import Self

from benchmarks.common import (
    PROMPTS,
    TextReward,
    apply_env,
    bare_trainer,
    command_line,
    finish,
    machine_info,
    markdown_table,
    prompt_batch,
    tiny_policy_lm,
    without_eos,
)

PHASES = ("rollout", "logprobs", "update")


@dataclass(frozen=True)
class Grid:
    """The configurations measured.

    Attributes:
        lm: ``TinyLM`` arguments of the policy.
        prompts: prompts per step (P), one configuration each.
        n: responses per prompt.
        lengths: response lengths (``max_new_tokens``, every response runs to it).
        budgets: ``token_budget`` values of the update (None: the whole batch in one pass).
        steps: steps per configuration (the last one is reported).
    """

    lm: dict[str, int]
    prompts: tuple[int, ...]
    n: int
    lengths: tuple[int, ...]
    budgets: tuple[int | None, ...]
    steps: int = 2


FULL = Grid(
    lm={"hidden_size": 256, "num_layers": 6, "num_heads": 4, "num_kv_heads": 2},
    prompts=(4, 16),
    n=4,
    lengths=(32, 96),
    budgets=(None, 2048),
)
SMOKE = Grid(
    lm={"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1},
    prompts=(2,),
    n=2,
    lengths=(8,),
    budgets=(None, 64),
)


def _rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc), so RSS measures live memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PhaseMemory:
    """Peak memory growth per named phase: a 1 ms RSS sampler thread (CPU) or the CUDA allocator's peak.

    Args:
        cuda: measure ``torch.cuda.max_memory_allocated`` instead of RSS.
    """

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.peaks: dict[str, float] = {}  # phase -> MiB above the phase's start
        self.absolute: dict[str, float] = {}  # phase -> MiB at the phase's peak
        self._peak = 0
        self._active = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Self:
        if not self.cuda:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            if self._active:
                self._peak = max(self._peak, _rss_bytes())
            time.sleep(0.001)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the block as phase ``name`` (a phase met again keeps its larger figure)."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            _trim_heap()
            start = self._peak = _rss_bytes()
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1
            if self.cuda:
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            else:
                peak = max(self._peak, _rss_bytes())
            growth, mib = (peak - start) / 2**20, peak / 2**20
            self.peaks[name] = max(self.peaks.get(name, 0.0), growth)
            self.absolute[name] = max(self.absolute.get(name, 0.0), mib)


def _instrument(system: Any, memory: PhaseMemory) -> None:
    """Route the system's phases through ``memory`` (wrapping its engine, log-prob and update calls)."""
    import torch

    generate, logprobs, update = system.rollout.generate, system.policy.response_logprobs, system._update

    def timed_generate(*args: Any, **kwargs: Any) -> Any:
        with memory.phase("rollout"):
            return generate(*args, **kwargs)

    def timed_logprobs(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():  # inside the update: measured there
            return logprobs(*args, **kwargs)
        with memory.phase("logprobs"):
            return logprobs(*args, **kwargs)

    def timed_update(*args: Any, **kwargs: Any) -> Any:
        with memory.phase("update"):
            return update(*args, **kwargs)

    system.rollout.generate = timed_generate
    system.policy.response_logprobs = timed_logprobs
    system._update = timed_update


def measure(
    lm: dict[str, int], prompts: int, n: int, length: int, token_budget: int | None, steps: int
) -> dict[str, Any]:
    """Peak memory per phase of the last of ``steps`` GRPO steps of one configuration.

    Args:
        lm: ``TinyLM`` arguments.
        prompts: prompts per step.
        n: responses per prompt.
        length: response length (every response runs to it).
        token_budget: the system's ``token_budget`` (None: no split).
        steps: steps to run.

    Returns:
        The configuration, ``mib`` (phase -> MiB growth), ``peak_mib`` (phase -> MiB at its peak), the
        device and the number of backward passes of the last update.
    """
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from qoq.models import adamw
    from qoq.rl.advantages import GRPO
    from qoq.rl.rollout import HFEngine
    from qoq.systems import PolicyOptimization
    from qoq.systems.policy_optimization import LossConfig
    from qoq.types import SamplingParams

    cuda = torch.cuda.is_available()
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(prompts)]
    batch = prompt_batch(texts)
    memory = PhaseMemory(cuda=cuda)
    with tempfile.TemporaryDirectory(prefix="qoq-mem-") as tmp, memory:
        system = PolicyOptimization(
            policy=tiny_policy_lm(lm),
            advantage=GRPO(),
            reward=TextReward(),
            rollout=without_eos(HFEngine()),
            sampling=SamplingParams(n=n, max_new_tokens=length, temperature=1.0, seed=0),
            loss=LossConfig(kl_coef=0.0),
            token_budget=token_budget,
            old_logprobs="forward",
            optimizer=adamw(lr=1e-5, weight_decay=0.01),
            trace_every=0,
            engine_dir=str(Path(tmp) / "engine"),
        )
        system.configure_model()
        _instrument(system, memory)
        passes: list[int] = []  # backward passes (micro-batches) per step
        backward = system.manual_backward

        def counted(*args: Any, **kwargs: Any) -> Any:
            passes[-1] += 1
            return backward(*args, **kwargs)

        system.manual_backward = counted

        class LastStepOnly(L.Callback):
            def on_train_batch_start(self, *args: Any) -> None:
                memory.peaks.clear()
                memory.absolute.clear()
                passes.append(0)

        trainer = bare_trainer(tmp, steps, [LastStepOnly()], accelerator="gpu" if cuda else "cpu")
        trainer.fit(system, DataLoader([batch] * steps, batch_size=None, collate_fn=lambda b: b))
    return {
        "prompts": prompts,
        "n": n,
        "length": length,
        "token_budget": token_budget,
        "device": "cuda" if cuda else "cpu",
        "mib": {p: memory.peaks.get(p, float("nan")) for p in PHASES},
        "peak_mib": {p: memory.absolute.get(p, float("nan")) for p in PHASES},
        "backward_passes": passes[-1] if passes else None,
    }


def run(smoke: bool = False, grid: Grid | None = None) -> dict[str, Any]:
    """Measure every configuration of ``grid`` (default: :data:`FULL`, or :data:`SMOKE`)."""
    apply_env()
    grid = grid or (SMOKE if smoke else FULL)
    rows = []
    for prompts in grid.prompts:
        for length in grid.lengths:
            for budget in grid.budgets:
                rows.append(measure(grid.lm, prompts, grid.n, length, budget, grid.steps))
    return {"grid": asdict(grid), "smoke": smoke, "rows": rows, "machine": machine_info()}


def render(results: dict[str, Any]) -> str:
    """A markdown table of the results."""
    rows = results["rows"]
    unit = "GPU allocated" if rows and rows[0]["device"] == "cuda" else "RSS growth"
    table = [
        {
            "P x n": f"{r['prompts']} x {r['n']}",
            "R": r["length"],
            "token_budget": r["token_budget"] or "-",
            "backward passes": r["backward_passes"],
            **{f"{p} MiB": r["mib"][p] for p in PHASES},
            "peak MiB": max(r["peak_mib"].values()),
        }
        for r in rows
    ]
    return (
        f"Peak memory per phase ({unit} above the phase start; policy {results['grid']['lm']})\n\n"
        + markdown_table(table)
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m benchmarks.memory [--smoke] [--out results.json]``."""
    args = command_line(__doc__.split("\n\n")[0], "one tiny configuration per setting").parse_args(argv)
    finish(run(smoke=args.smoke), args.out, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
