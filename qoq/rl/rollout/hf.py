"""Rollouts with ``transformers`` ``generate`` on the trainer's own module.

The reference engine: no second copy of the weights (so nothing can go stale), slow but exact. The
sampling transforms are applied by our own processor list, in vLLM's order (suppress -> temperature ->
top-k -> top-p), under a plain generation config, so a checkpoint's ``generation_config.json`` (e.g. a
repetition penalty) cannot silently change the sampling distribution. The log-prob of each sampled
token is read from the processed logits step by step (no ``[N, R, V]`` score tensor is kept).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qoq.rl.rollout import base
from qoq.types import RolloutBatch, SamplingParams


class _SampledTokenLogprobs(LogitsProcessor):
    """Last processor of the list: records ``log_softmax(processed logits)`` at each sampled token.

    ``generate`` calls it once per step before sampling; the token sampled at step ``t`` is visible at
    call ``t + 1`` (``input_ids[:, -1]``), so only one step's ``[N, V]`` log-softmax is held at a time.
    """

    def __init__(self) -> None:
        self.pending: Tensor | None = None  # [N, V] of the last step
        self.values: list[Tensor] = []  # each [N]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.pending is not None:
            self.values.append(self.pending.gather(-1, input_ids[:, -1:])[:, 0])
        self.pending = scores.log_softmax(-1)
        return scores

    def collect(self, sequences: Tensor) -> Tensor:
        """The log-probs ``[N, T]`` of the generated ``sequences [N, T]``."""
        steps = sequences.shape[1]
        if self.pending is not None and len(self.values) < steps:
            self.values.append(self.pending.gather(-1, sequences[:, len(self.values), None])[:, 0])
        self.pending = None
        if not self.values:
            return sequences.new_zeros(sequences.shape, dtype=torch.float32)
        return torch.stack(self.values[:steps], dim=1).float()


@contextlib.contextmanager
def _plain_generation(model: Any) -> Iterator[None]:
    """Eval mode and an empty generation config for the duration (both restored afterwards)."""
    saved_config, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved_config
        model.train(was_training)


class HFEngine:
    """Samples with ``model.generate(inputs_embeds=...)`` on the trainer's module (sync is a no-op).

    Args:
        batch_size: prompts per ``generate`` call (each expanded to ``n`` rows); None for all at once.
    """

    def __init__(self, batch_size: int | None = None) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._ids: base.SpecialIds | None = None

    def setup(self, model: Any, tokenizer: Any, workdir: Path, suppress_token_ids: Sequence[int] = (),
              eos_token_ids: Sequence[int] = ()) -> None:  # fmt: skip
        """Bind the engine to the policy LM the trainer optimises (a peft wrapper is looked through);
        ``workdir`` is unused: no copy is made. Arguments as :meth:`RolloutEngine.setup`."""
        model = base.unwrap_peft(model)
        self._model, self._tokenizer = model, tokenizer
        self._ids = base.resolve_special_ids(model, tokenizer, suppress_token_ids, eos_token_ids)

    def _processors(self, params: SamplingParams, device: torch.device) -> list[LogitsProcessor]:
        assert self._ids is not None
        procs: list[LogitsProcessor] = []
        if self._ids.suppress:
            procs.append(SuppressTokensLogitsProcessor(list(self._ids.suppress), device=device))
        if params.temperature > 0:
            if params.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                procs.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                procs.append(TopPLogitsWarper(params.top_p))
        return procs

    def generate(self, prompt_embeds: list[Tensor], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses per prompt embedding ``[L_i, H]`` (see :mod:`.base` for fields).

        Args:
            prompt_embeds: one ``[L_i, H]`` tensor per prompt.
            params: sampling settings; ``temperature=0`` is greedy; ``seed`` makes the draw reproducible
                without touching the global RNG state.
        """
        if self._model is None or self._ids is None:
            raise RuntimeError("HFEngine.generate() before setup()")
        model, ids = self._model, self._ids
        embedding = model.get_input_embeddings().weight
        base.check_sampling_params(params)
        base.check_prompt_embeds(prompt_embeds, embedding.shape[1])
        device, dtype = embedding.device, embedding.dtype
        eos = torch.tensor(ids.eos, device=device)
        step = self.batch_size or len(prompt_embeds)
        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        truncated: list[bool] = []
        # seeded: a private RNG stream; unseeded calls draw from (and advance) the global one
        seeded = contextlib.nullcontext()
        if params.seed is not None:
            seeded = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with _plain_generation(model), seeded, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(prompt_embeds), step):
                chunk = prompt_embeds[start : start + step]
                length = max(e.shape[0] for e in chunk)
                embeds = torch.zeros(len(chunk), length, embedding.shape[1], device=device, dtype=dtype)
                mask = torch.zeros(len(chunk), length, dtype=torch.long, device=device)  # [B, L]
                for row, emb in enumerate(chunk):  # left padding
                    embeds[row, length - emb.shape[0] :] = emb.to(device=device, dtype=dtype)
                    mask[row, length - emb.shape[0] :] = 1
                recorder = _SampledTokenLogprobs()
                # neutral: our processors do the warping (HF's global default would add top_k=50)
                sampling = {"top_k": 0, "top_p": 1.0, "temperature": 1.0} if params.temperature > 0 else {}
                seqs = model.generate(
                    inputs_embeds=embeds,
                    attention_mask=mask,
                    do_sample=params.temperature > 0,
                    max_new_tokens=params.max_new_tokens,
                    num_return_sequences=params.n,
                    logits_processor=LogitsProcessorList([*self._processors(params, device), recorder]),
                    eos_token_id=list(ids.eos),
                    pad_token_id=ids.pad,
                    **sampling,
                )  # [B * n, T], new tokens only
                lps = recorder.collect(seqs)  # [B * n, T]
                is_eos = torch.isin(seqs, eos)  # [B * n, T]
                has_eos = is_eos.any(dim=1)
                ends = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, seqs.shape[1]).tolist()
                for row, end in enumerate(ends):
                    tokens.append(seqs[row, :end].tolist())
                    logprobs.append(lps[row, :end].tolist())
                truncated.extend((~has_eos).tolist())
        return base.assemble_rollout(tokens, logprobs, truncated, params.n, ids.pad, self._tokenizer)

    def sync_weights(self, weights: Iterable[tuple[str, Tensor]]) -> base.SyncReport:
        """No-op: the engine samples from the trainer's module itself (``weights`` is not consumed)."""
        start = time.perf_counter()
        return base.SyncReport(seconds=time.perf_counter() - start, num_tensors=0, num_bytes=0, verified=True)

    def close(self) -> None:
        """Drop the references to the model and tokenizer."""
        self._model = self._tokenizer = self._ids = None
