"""qoq's vLLM (v1) logits processor: suppressed token ids set to ``-inf``, exactly.

vLLM imports this module by name (``VLLMEngine`` passes
``logits_processors=["qoq.rl.rollout.vllm_logits:SuppressTokens"]``); it imports ``vllm``, so nothing
else in qoq imports it. vLLM's own logit bias is capped at +-100, which a policy whose logits favour a
multimodal placeholder id by more than that overcomes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from qoq.rl.rollout.vllm import SUPPRESS_KEY


class SuppressTokens(LogitsProcessor):
    """Sets the ids in a request's ``SamplingParams.extra_args[SUPPRESS_KEY]`` to ``-inf``.

    Not argmax-invariant, so vLLM applies it where it applies its logit bias: before the temperature,
    top-k / top-p and the processed log-probs (which are then renormalised over the allowed ids).
    Requests without the key are left alone.
    """

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.rows: dict[int, tuple[int, ...]] = {}  # persistent-batch row -> suppressed ids
        self.index: tuple[Tensor, Tensor] | None = None  # ([K] rows, [K] ids) to set to -inf

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Follow the persistent batch: removed, then added, then moved rows (vLLM's order)."""
        if batch_update is None:
            return
        for row in batch_update.removed:
            self.rows.pop(row, None)
        for row, params, _, _ in batch_update.added:
            ids = tuple((params.extra_args or {}).get(SUPPRESS_KEY, ()))
            if ids:
                self.rows[row] = ids
            else:  # a new request may take the row of one that suppressed
                self.rows.pop(row, None)
        for a, b, direction in batch_update.moved:
            entry_a, entry_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if entry_a is not None:
                self.rows[b] = entry_a
            if direction == MoveDirectionality.SWAP and entry_b is not None:
                self.rows[a] = entry_b
        rows = [row for row, ids in self.rows.items() for _ in ids]
        cols = [i for ids in self.rows.values() for i in ids]
        self.index = (
            torch.tensor(rows, dtype=torch.long, device=self.device),
            torch.tensor(cols, dtype=torch.long, device=self.device),
        )

    def apply(self, logits: Tensor) -> Tensor:
        """``[B, V]`` logits with the suppressed ids of each row at ``-inf``."""
        if self.rows and self.index is not None:
            logits[self.index] = float("-inf")
        return logits
