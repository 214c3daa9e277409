"""One small benchmark build shared by the builder tests and the runner's smoke test (the demo set it
derives from takes ~40 s to build; everything after that reuses it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.run_ablation import SMOKE_COUNTS, SMOKE_EVAL_PER_DOMAIN


@pytest.fixture(scope="session")
def small_benchmark(tmp_path_factory) -> Path:
    """The ``--smoke`` benchmark (all seven domains, 1-8 training records each), built once."""
    from qoq.data.benchmark import build_benchmark

    out = tmp_path_factory.mktemp("benchmark")
    build_benchmark(out, seed=0, counts=SMOKE_COUNTS, eval_per_domain=SMOKE_EVAL_PER_DOMAIN, quiet=True)
    return out
