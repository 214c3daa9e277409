"""Rollout engines: HF ``generate`` and an in-process vLLM engine behind one protocol (see ``base``).

Importing this package never imports ``vllm`` (the vLLM engine imports it in ``setup``).
"""

from qoq.rl.rollout.base import RolloutEngine, StaleWeightsError, SyncReport, assemble_rollout
from qoq.rl.rollout.hf import HFEngine
from qoq.rl.rollout.vllm import VLLMEngine

__all__ = ["HFEngine", "RolloutEngine", "StaleWeightsError", "SyncReport", "VLLMEngine", "assemble_rollout"]
