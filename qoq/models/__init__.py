"""qoq's model components: modality encoders, the fusion projector, the policy, LM builders, the tokenizer.

Each component is a LightningModule usable on its own training stage (encoders: classification on a
domain's labels; projector: alignment; policy: SFT); ``qoq.systems.PolicyOptimization`` composes them for RL.
"""

from qoq.models.builders import (
    LMBuilder,
    PretrainedLM,
    Qwen2_5_0_5B_Instruct,
    Qwen2_5_7B_Instruct,
    SiglipVisionEncoder,
    TinyLM,
)
from qoq.models.encoders import ECGEncoder, ModalityEncoder, VisionEncoder, VolumeEncoder, load_weights
from qoq.models.optim import LRSchedule, OptimizerCallable, adamw, decay_groups
from qoq.models.policy import DEFAULT_SYSTEM_PROMPT, Policy, PolicyOptions, tiny_policy
from qoq.models.projector import FusionProjector
from qoq.models.tokenizer import build_tokenizer

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "ECGEncoder",
    "FusionProjector",
    "LRSchedule",
    "LMBuilder",
    "ModalityEncoder",
    "Policy",
    "PolicyOptions",
    "PretrainedLM",
    "Qwen2_5_0_5B_Instruct",
    "Qwen2_5_7B_Instruct",
    "SiglipVisionEncoder",
    "TinyLM",
    "VisionEncoder",
    "VolumeEncoder",
    "build_tokenizer",
    "adamw",
    "decay_groups",
    "OptimizerCallable",
    "load_weights",
    "tiny_policy",
]
