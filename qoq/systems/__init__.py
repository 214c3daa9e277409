"""Lightning systems that compose qoq's components into a training loop."""

from qoq.systems.policy_optimization import LossConfig, PolicyOptimization

__all__ = ["LossConfig", "PolicyOptimization"]
