"""Fixtures of the benchmark smoke tests."""

from __future__ import annotations

import pytest

from benchmarks import common


@pytest.fixture(scope="session")
def bench_site():
    """The folder with TRL for the step benchmark (installed on first use); skips without a registry."""
    try:
        return common.bench_site()
    except RuntimeError as exc:
        pytest.skip(f"TRL could not be installed for the benchmark: {exc}")
