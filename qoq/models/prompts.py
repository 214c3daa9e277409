"""Multimodal prompts as LM input embeddings: modality items encoded and projected, then spliced into the
chat-formatted text at their placeholders (``<image>``, ``<video>``, ``<ecg>``).

:meth:`qoq.models.Policy.prompt_embeds` runs the two steps: :func:`project_items` (encoder ->
projector, per kind) and :func:`splice` (text pieces through the LM's input embeddings, each placeholder
replaced by its item's tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from qoq.types import PLACEHOLDERS, PromptBatch

PLACEHOLDER_RE = re.compile("|".join(re.escape(p) for p in PLACEHOLDERS.values()))
_KIND_OF = {placeholder: kind for kind, placeholder in PLACEHOLDERS.items()}

#: One way items are encoded: ``(item kind, encoder, projector kind)``.
EncoderPath = tuple[str, str, str]


def project_items(
    batch: PromptBatch, encoders: Mapping[str, nn.Module], projector: Any, paths: Sequence[EncoderPath]
) -> tuple[dict[str, Tensor], Tensor | None]:
    """kind -> projected tokens ``[M, T', H]`` of that kind's items, and a zero anchor or None.

    Under data parallelism (``torch.distributed`` with several ranks) every encoder path runs at every
    call, in the same order on every rank: on an all-zero :meth:`~qoq.models.ModalityEncoder.dummy_input`
    where the batch has no item of its kind. Sharded ranks (FSDP) then run the same all-gathers and,
    through the anchor (0 x the dummy outputs, to be added to the first prompt), the same reduce-scatters,
    whichever modalities their prompts hold; otherwise a text-only rank next to an image rank
    desynchronises the collectives (a crash on gloo, a hang on NCCL).

    Args:
        batch: the prompts and their items.
        encoders: encoder name -> encoder ``[M, ...] -> [M, T, D]``.
        projector: ``projector(kind, tokens [M, T, D]) -> [M, T', H]``.
        paths: every way items are encoded, in one fixed order.

    Raises:
        ValueError: the batch has items of a kind no path encodes.
    """
    for kind, items in batch.modalities.items():
        if len(items.values) and kind not in {k for k, _, _ in paths}:
            raise ValueError(
                f"batch has {len(items.values)} {kind!r} item(s) "
                f"(records {_ids_of(batch, items.owner)}) but "
                f"the policy has no {kind!r} encoder (it has {sorted(encoders) or 'none'})"
            )
    every = data_parallel()
    out: dict[str, Tensor] = {}
    anchor: Tensor | None = None
    for kind, encoder, projection in paths:
        items = batch.modalities.get(kind)
        if items is not None and len(items.values):
            out[kind] = projector(projection, encoders[encoder](items.values))
        elif every:
            module = encoders[encoder]
            dummy = projector(projection, module(module.dummy_input()))
            anchor = dummy.sum() * 0.0 if anchor is None else anchor + dummy.sum() * 0.0
    return out, anchor


def splice(
    batch: PromptBatch,
    texts: Sequence[str],
    tokenizer: Any,
    embed: Callable[[Tensor], Tensor],
    device: torch.device,
    projected: Mapping[str, Tensor],
    max_tokens: int | None = None,
) -> list[Tensor]:
    """Embed each chat-formatted prompt with its projected items spliced in at the placeholders.

    Args:
        batch: P prompts; the j-th placeholder of kind k in prompt p takes the j-th item of kind k whose
            owner is p.
        texts: the P prompts, chat-formatted.
        tokenizer: the LM's tokenizer.
        embed: the LM's input embeddings, token ids ``[K] -> [K, H]``.
        device: where ``embed`` takes its ids.
        projected: kind -> projected tokens ``[M, T', H]`` (:func:`project_items`).
        max_tokens: longest allowed prompt in embeddings; None: no limit.

    Returns:
        P tensors ``[L_i, H]`` (LM embedding dtype).

    Raises:
        ValueError: an item's owner is outside the batch, a prompt's placeholders and items do not match,
            or a prompt exceeds ``max_tokens``.
    """
    items_of: dict[str, list[list[int]]] = {k: [[] for _ in range(len(batch))] for k in PLACEHOLDERS}
    for kind, items in batch.modalities.items():
        for m, p in enumerate(items.owner.tolist()):
            if not 0 <= p < len(batch):
                raise ValueError(
                    f"{kind!r} item {m} has owner {p} outside the batch of {len(batch)} prompts"
                )
            items_of.setdefault(kind, [[] for _ in range(len(batch))])[p].append(m)

    pieces = [PLACEHOLDER_RE.split(text) for text in texts]  # P x (n_placeholders + 1) strings
    ids = tokenizer([piece for row in pieces for piece in row], add_special_tokens=False)["input_ids"]
    table = embed(torch.tensor([i for x in ids for i in x], dtype=torch.long, device=device))
    text_embeds = list(table.split([len(x) for x in ids]))  # one [len, H] per piece

    out = []
    for p, text in enumerate(texts):
        placeholders = PLACEHOLDER_RE.findall(text)
        for kind, placeholder in PLACEHOLDERS.items():
            have, want = len(items_of[kind][p]), placeholders.count(placeholder)
            if have != want:
                raise ValueError(
                    f"prompt {batch.ids[p]!r}: {want} {placeholder} placeholder(s) "
                    f"but {have} {kind!r} item(s)"
                )
        taken = {kind: iter(items_of[kind][p]) for kind in PLACEHOLDERS}
        parts = [text_embeds.pop(0)]
        for placeholder in placeholders:
            kind = _KIND_OF[placeholder]
            parts.append(projected[kind][next(taken[kind])].to(table.dtype))
            parts.append(text_embeds.pop(0))
        embeds = torch.cat(parts)  # [L_p, H]
        if max_tokens is not None and len(embeds) > max_tokens:
            raise ValueError(
                f"prompt {batch.ids[p]!r}: {len(embeds)} embeddings > max_prompt_tokens={max_tokens}"
            )
        out.append(embeds)
    return out


def data_parallel() -> bool:
    """Whether this process is one of several ``torch.distributed`` ranks."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _ids_of(batch: PromptBatch, owner: Tensor) -> list[str]:
    return sorted({batch.ids[p] for p in owner.tolist() if 0 <= p < len(batch)})[:3]


__all__ = ["PLACEHOLDER_RE", "data_parallel", "project_items", "splice"]
