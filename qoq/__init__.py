"""qoq: multimodal clinical policies trained with domain-aware GRPO (DRPO) on Lightning."""

__version__ = "0.1.0"
