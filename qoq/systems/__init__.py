"""Lightning systems that compose qoq's components into a training loop."""

from qoq.systems.policy_optimization import LossConfig, NonFiniteError, PolicyOptimization

__all__ = ["LossConfig", "NonFiniteError", "PolicyOptimization"]
