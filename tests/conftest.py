"""Test-wide settings (no hub access, small vLLM KV cache, in-process engine, deterministic CPU) and the
shared fixtures: ``quiet_trainer``, ``fit``, ``make_batch``, ``tiny_text_policy`` (see :mod:`qoq.testing`)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qoq import testing  # noqa: E402 - after the environment above


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: tiny models are overhead-bound, and two threads on a busy
    2-core machine spin against each other (measured ~10x slower steps)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quiet_trainer():
    """The CPU Trainer factory: ``quiet_trainer(max_steps=-1, **trainer_args)`` (no logger, checkpoints,
    progress bar, summary or sanity validation)."""
    return testing.quiet_trainer


@pytest.fixture
def fit():
    """The stand-alone stage runner: ``fit(module, batches, steps, **trainer_args) -> Trainer``."""
    return testing.fit


@pytest.fixture
def make_batch():
    """The prompt batch factory: ``make_batch(texts, answers=None, modalities=None, labels=...,
    references=None, domains=None)``."""
    return testing.make_batch


@pytest.fixture
def tiny_text_policy():
    """The text-only tiny policy factory: ``tiny_text_policy(lm=None, **options)`` (unbuilt)."""
    return testing.tiny_text_policy
