"""The rollout-engine protocol and what every engine shares (one home each).

An engine turns prompt embeddings into sampled responses (:class:`qoq.types.RolloutBatch`) and keeps its
copy of the policy weights current (:meth:`RolloutEngine.sync_weights`). Prompts always arrive as
embeddings, so fused multimodal prompts need nothing model-specific in the engine.

Log-prob convention (both engines): ``engine_logprobs`` is the log-softmax of the *processed* logits at
the sampled token, i.e. ``log_softmax(logits / temperature)`` after suppressed ids are set to ``-inf``
and after any top-k / top-p cut. With ``top_k=-1``, ``top_p=1`` and no suppressed ids this is exactly
``log_softmax(logits / T)`` that a trainer computes at the same temperature; greedy decoding
(``temperature=0``) reports ``log_softmax(logits)`` (temperature 1).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from qoq.types import RolloutBatch, SamplingParams


@dataclass(frozen=True)
class SyncReport:
    """What one weight sync did.

    Attributes:
        seconds: wall time of the push (and its verification).
        num_tensors: tensors pushed.
        num_bytes: bytes pushed (as given, before any dtype cast by the engine).
        verified: True when the engine checked that it now holds the pushed weights (or, for an engine
            that samples from the trainer's own module, when no copy exists to go stale).
    """

    seconds: float
    num_tensors: int
    num_bytes: int
    verified: bool


class StaleWeightsError(RuntimeError):
    """The rollout engine's weights differ from the ones the trainer pushed."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What the RL system needs from a rollout engine."""

    def setup(self, model: Any, tokenizer: Any, workdir: Path, suppress_token_ids: Sequence[int] = (),
              eos_token_ids: Sequence[int] = ()) -> None:  # fmt: skip
        """Bind the engine to a built policy LM (called once, after the model exists).

        Args:
            model: the HF causal LM (``transformers.PreTrainedModel``) whose weights the engine samples.
            tokenizer: its tokenizer (pad / EOS ids, decoding).
            workdir: a folder the engine may write to (e.g. a saved copy of the model).
            suppress_token_ids: token ids never to sample (e.g. multimodal placeholder tokens).
            eos_token_ids: ids that end a response; empty means the model's / tokenizer's EOS.
        """
        ...

    def generate(self, prompt_embeds: list[Tensor], params: SamplingParams) -> RolloutBatch:
        """Sample ``params.n`` responses for each prompt ``[L_i, H]``, grouped contiguously by prompt."""
        ...

    def sync_weights(self, weights: Iterable[tuple[str, Tensor]]) -> SyncReport:
        """Make the engine sample from ``weights`` (HF names, full tensors, LoRA merged) from now on."""
        ...

    def close(self) -> None:
        """Release the engine's resources."""
        ...


def unwrap_peft(model: Any) -> Any:
    """The transformers model under a peft ``PeftModel`` wrapper (LoRA layers stay injected), else ``model``."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def check_sampling_params(params: SamplingParams) -> None:
    """Raise ``ValueError`` naming the field when ``params`` cannot be honoured by an engine (settings
    changed after construction; :meth:`SamplingParams.validate`)."""
    params.validate()


def check_prompt_embeds(prompt_embeds: Sequence[Tensor], hidden_size: int) -> None:
    """Raise ``ValueError`` naming the prompt when an embedding is not a non-empty ``[L, hidden_size]``."""
    if len(prompt_embeds) == 0:
        raise ValueError("generate() needs at least one prompt embedding")
    for i, emb in enumerate(prompt_embeds):
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] != hidden_size:
            raise ValueError(f"prompt_embeds[{i}] must be [L > 0, {hidden_size}], got {tuple(emb.shape)}")


@dataclass(frozen=True)
class SpecialIds:
    """The token ids an engine needs to stop, pad and forbid.

    Attributes:
        pad: id that right-pads ``response_ids``.
        eos: ids that end a response.
        suppress: ids never sampled.
    """

    pad: int
    eos: tuple[int, ...]
    suppress: tuple[int, ...]


def resolve_special_ids(
    model: Any, tokenizer: Any, suppress_token_ids: Sequence[int], eos_token_ids: Sequence[int]
) -> SpecialIds:
    """Pick pad / EOS ids (explicit > model generation config > tokenizer) and check the suppressed ids.

    Args:
        model: the HF causal LM (its ``generation_config`` and vocabulary size are read).
        tokenizer: its tokenizer.
        suppress_token_ids: ids never to sample.
        eos_token_ids: ids that end a response; empty means the model's / tokenizer's EOS.

    Raises:
        ValueError: no EOS id can be found, an id is outside the vocabulary, or an EOS id is suppressed.
    """
    eos = [int(i) for i in eos_token_ids]
    if not eos:
        config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if config_eos is not None:
            eos = [int(i) for i in (config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])]
    if not eos and tokenizer.eos_token_id is not None:
        eos = [int(tokenizer.eos_token_id)]
    if not eos:
        raise ValueError("no EOS id: pass eos_token_ids or set the model's generation_config / tokenizer EOS")
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    pad = eos[0] if pad is None else int(pad)
    vocab = model.get_output_embeddings().weight.shape[0]
    suppress = tuple(sorted({int(i) for i in suppress_token_ids}))
    for name, ids in (("eos_token_ids", eos), ("suppress_token_ids", suppress), ("pad id", [pad])):
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"{name} {bad} outside the vocabulary [0, {vocab})")
    if set(eos) & set(suppress):
        raise ValueError(f"EOS ids {sorted(set(eos) & set(suppress))} are also in suppress_token_ids")
    return SpecialIds(pad=pad, eos=tuple(dict.fromkeys(eos)), suppress=suppress)


def assemble_rollout(
    token_ids: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]] | None,
    truncated: Sequence[bool],
    n: int,
    pad_id: int,
    tokenizer: Any,
) -> RolloutBatch:
    """Pad per-response token lists into a :class:`RolloutBatch` (the one place engines build it).

    Args:
        token_ids: ``N = P * n`` responses, grouped by prompt, each ending with its EOS unless truncated.
        logprobs: the engine's log-prob of each of those tokens, or None.
        truncated: per response, whether it stopped at the length cap instead of an EOS.
        n: responses per prompt.
        pad_id: id that right-pads ``response_ids``.
        tokenizer: decodes the texts (special tokens and the final EOS removed).
    """
    num = len(token_ids)
    if num % n or len(truncated) != num or (logprobs is not None and len(logprobs) != num):
        raise ValueError(
            f"{num} responses, {len(truncated)} truncation flags for groups of {n}: sizes differ"
        )
    width = max((len(t) for t in token_ids), default=0)
    ids = torch.full((num, width), pad_id, dtype=torch.long)  # [N, R]
    mask = torch.zeros(num, width, dtype=torch.bool)  # [N, R]
    lps = torch.zeros(num, width) if logprobs is not None else None  # [N, R]
    for row, toks in enumerate(token_ids):
        ids[row, : len(toks)] = torch.as_tensor(list(toks), dtype=torch.long)
        mask[row, : len(toks)] = True
        if lps is not None:
            lps[row, : len(toks)] = torch.as_tensor(list(logprobs[row]), dtype=torch.float32)
    # the final EOS is a terminator, not content (it may be an ordinary token chosen as EOS)
    content = [list(t) if cut else list(t)[:-1] for t, cut in zip(token_ids, truncated)]
    texts = tokenizer.batch_decode(content, skip_special_tokens=True)
    return RolloutBatch(
        prompt_index=torch.arange(num // n).repeat_interleave(n),  # [N]
        response_ids=ids,
        response_mask=mask,
        texts=texts,
        engine_logprobs=lps,
        truncated=torch.as_tensor(list(truncated), dtype=torch.bool),  # [N]
    )
