"""Rollout engines: HF ``generate``, an in-process vLLM engine and a scripted one (tests) behind one protocol.

Importing this package never imports ``vllm`` (the vLLM engine imports it in ``setup``).
"""

from qoq.rl.rollout.base import RolloutEngine, StaleWeightsError, SyncReport, assemble_rollout
from qoq.rl.rollout.hf import HFEngine
from qoq.rl.rollout.scripted import ScriptedEngine
from qoq.rl.rollout.vllm import VLLMEngine

__all__ = [
    "HFEngine",
    "RolloutEngine",
    "ScriptedEngine",
    "StaleWeightsError",
    "SyncReport",
    "VLLMEngine",
    "assemble_rollout",
]
