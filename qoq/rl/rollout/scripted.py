"""A rollout engine that answers from a script: for tests and dry runs of the RL loop without sampling.

``ScriptedEngine`` follows the :class:`~qoq.rl.rollout.base.RolloutEngine` protocol: ``generate`` returns
the next ``P x n`` texts of its script (cycled), tokenized and grouped by prompt like a real engine's
output (each response ends with an EOS); ``sync_weights`` counts the pushes. Without ``setup`` it
tokenizes by character code (pad 0, EOS 1), so it also works without a policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from qoq.rl.rollout.base import SyncReport, assemble_rollout, check_sampling_params, resolve_special_ids
from qoq.types import RolloutBatch, SamplingParams


class _CharTokenizer:
    """Character codes as token ids (pad 0, EOS 1): enough to decode a scripted response."""

    pad_token_id = 0
    eos_token_id = 1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def batch_decode(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        return ["".join(chr(int(i)) for i in row if int(i) > 1) for row in ids]


class ScriptedEngine:
    """Rollouts from a fixed list of texts; counts generations and weight syncs.

    Args:
        texts: the responses, in order (prompt by prompt, ``n`` per prompt), cycled across calls; a test
            may replace ``texts`` between calls.
        logprob: the engine log-prob reported for every response token, or None (no engine log-probs).

    Attributes:
        calls: the ``SamplingParams`` of each ``generate`` call.
        syncs: how many times weights were pushed (``sync_weights``).
        synced_tensors: tensors in the last push.
    """

    def __init__(self, texts: Sequence[str] = ("\\boxed{normal}",), logprob: float | None = None) -> None:
        if not texts:
            raise ValueError("ScriptedEngine needs at least one text")
        self.texts, self.logprob = list(texts), logprob
        self.calls: list[SamplingParams] = []
        self.syncs = 0
        self.synced_tensors = 0
        self._next = 0
        self._tokenizer: Any = _CharTokenizer()
        self._eos, self._pad = 1, 0

    def setup(self, model: Any, tokenizer: Any, workdir: Path, suppress_token_ids: Sequence[int] = (),
              eos_token_ids: Sequence[int] = ()) -> None:  # fmt: skip
        """Tokenize with the policy's tokenizer and end responses with its first EOS id."""
        ids = resolve_special_ids(model, tokenizer, suppress_token_ids, eos_token_ids)
        self._tokenizer, self._eos, self._pad = tokenizer, ids.eos[0], ids.pad

    def generate(self, prompt_embeds: list[Tensor], params: SamplingParams) -> RolloutBatch:
        """The next ``len(prompt_embeds) x params.n`` texts of the script, cut at ``max_new_tokens``."""
        check_sampling_params(params)
        self.calls.append(params)
        tokens, cut = [], []
        for _ in range(len(prompt_embeds) * params.n):
            text = self.texts[self._next % len(self.texts)]
            self._next += 1
            ids = [*self._tokenizer.encode(text, add_special_tokens=False), self._eos]
            tokens.append(ids[: params.max_new_tokens])
            cut.append(len(ids) > params.max_new_tokens)
        logprobs = None if self.logprob is None else [[self.logprob] * len(t) for t in tokens]
        return assemble_rollout(tokens, logprobs, cut, params.n, self._pad, self._tokenizer)

    def sync_weights(self, weights: Iterable[tuple[str, Tensor]]) -> SyncReport:
        """Count the push (nothing is copied: the script does not depend on the weights)."""
        start = time.perf_counter()
        tensors = [t for _, t in weights]
        self.syncs += 1
        self.synced_tensors = len(tensors)
        num_bytes = sum(t.numel() * t.element_size() for t in tensors)
        return SyncReport(time.perf_counter() - start, len(tensors), num_bytes, verified=True)

    def close(self) -> None:
        """Nothing to release."""


__all__ = ["ScriptedEngine"]
