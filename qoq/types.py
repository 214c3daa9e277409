"""The typed records and batches that flow between qoq's components (one definition each).

Shape letters used in comments:
    P  prompts in a batch              n  rollouts per prompt (group size)
    N  responses = P * n               R  response length (padded)
    L  prompt length in embeddings     H  language-model hidden size
    K  ground-truth boxes of a sample
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: Placeholder tokens in a record's ``problem`` text, one per modality item, keyed by modality kind.
#: ``video`` covers cines and 3-D volumes (both are sampled into frames).
PLACEHOLDERS: dict[str, str] = {"image": "<image>", "video": "<video>", "ecg": "<ecg>"}


@dataclass(frozen=True)
class RewardTarget:
    """What a response is scored against (all in the frame the model saw).

    Attributes:
        answer: ground-truth label set (multi-label allowed).
        labels: the dataset's closed label set.
        boxes: ground-truth boxes ``[K, 4]`` as ``x1, y1, x2, y2`` pixels of the resized image, or None.
        mask: ground-truth mask ``[H, W]`` (bool) of the resized image, or None.
        image_size: ``(H, W)`` of the resized image the boxes refer to, or None (the box-reward guard's
            coverage limit needs it when there is no mask).
    """

    answer: tuple[str, ...]
    labels: tuple[str, ...]
    boxes: Tensor | None = None
    mask: Tensor | None = None
    image_size: tuple[int, int] | None = None

    @property
    def has_region(self) -> bool:
        """Whether this target carries a box or mask annotation (and so an IoU term)."""
        return (self.boxes is not None and len(self.boxes) > 0) or self.mask is not None


@dataclass
class ModalityBatch:
    """All items of one modality kind in a batch, in placeholder order.

    Attributes:
        values: stacked items: image ``[M, 3, h, w]``, video ``[M, F, 3, h, w]``, ecg ``[M, leads, T]``.
        owner: ``[M]`` long, index of the prompt each item belongs to (non-decreasing).
    """

    values: Tensor
    owner: Tensor

    def to(self, device: torch.device | str) -> ModalityBatch:
        return ModalityBatch(self.values.to(device), self.owner.to(device))


@dataclass
class PromptBatch:
    """A collated batch of P prompts, as the data modules yield it.

    Attributes:
        ids: ``P`` record ids.
        texts: ``P`` user messages with placeholders (``<image>``, ``<video>``, ``<ecg>``), not yet
            chat-formatted.
        modalities: kind -> items; the j-th placeholder of kind k in prompt p is the j-th item of kind k
            whose owner is p.
        targets: ``P`` reward targets (answer, label set, boxes/masks in the seen frame).
        domains: ``P`` clinical domain names.
        datasets: ``P`` dataset names.
        domain_ids: ``[P]`` long, index of each domain in the data module's domain vocabulary.
        references: ``P`` reference responses (for SFT), or None.
        origins: ``P`` "real" or "synthetic".
        stream_index: position of this batch in its sampler's stream (for exact resume), or -1.
    """

    ids: list[str]
    texts: list[str]
    modalities: dict[str, ModalityBatch]
    targets: list[RewardTarget]
    domains: list[str]
    datasets: list[str]
    domain_ids: Tensor
    references: list[str] | None = None
    origins: list[str] = field(default_factory=list)
    stream_index: int = -1

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, index: Sequence[int]) -> PromptBatch:
        """The sub-batch of the prompts at ``index`` (in that order), with their modality items.

        Items keep their relative order, so the j-th placeholder of a prompt still takes its j-th item.

        Args:
            index: prompt positions in this batch (distinct).

        Returns:
            A :class:`PromptBatch` of ``len(index)`` prompts; item owners renumbered to the new positions.
        """
        index = list(index)
        modalities = {}
        for kind, items in self.modalities.items():
            where = torch.full((len(self),), -1, dtype=torch.long, device=items.owner.device)  # old -> new
            where[torch.as_tensor(index, dtype=torch.long, device=items.owner.device)] = torch.arange(
                len(index), device=items.owner.device
            )
            owner = where[items.owner]  # [M], -1 for items of prompts left out
            keep = torch.nonzero(owner >= 0).flatten()
            order = keep[torch.argsort(owner[keep], stable=True)]  # items grouped by their new prompt
            modalities[kind] = ModalityBatch(items.values[order.to(items.values.device)], owner[order])
        return PromptBatch(
            ids=[self.ids[i] for i in index],
            texts=[self.texts[i] for i in index],
            modalities=modalities,
            targets=[self.targets[i] for i in index],
            domains=[self.domains[i] for i in index],
            datasets=[self.datasets[i] for i in index],
            domain_ids=self.domain_ids[torch.as_tensor(index, dtype=torch.long, device=self.domain_ids.device)],
            references=[self.references[i] for i in index] if self.references is not None else None,
            origins=[self.origins[i] for i in index] if self.origins else [],
            stream_index=self.stream_index,
        )

    def to(self, device: torch.device | str) -> PromptBatch:
        """Move tensors (modalities, domain ids) to ``device``; targets stay on CPU for rewards."""
        return PromptBatch(
            ids=self.ids,
            texts=self.texts,
            modalities={k: v.to(device) for k, v in self.modalities.items()},
            targets=self.targets,
            domains=self.domains,
            datasets=self.datasets,
            domain_ids=self.domain_ids.to(device),
            references=self.references,
            origins=self.origins,
            stream_index=self.stream_index,
        )

    @staticmethod
    def concat(batches: list[PromptBatch]) -> PromptBatch:
        """The prompts of several batches, in order; ``stream_index`` is the first batch's.

        Raises:
            ValueError: if items of one modality kind differ in shape across the batches.
        """
        if not batches:
            raise ValueError("PromptBatch.concat: no batches")
        if len(batches) == 1:
            return batches[0]
        modalities: dict[str, ModalityBatch] = {}
        offset = 0
        parts: dict[str, list[ModalityBatch]] = {}
        for b in batches:
            for kind, items in b.modalities.items():
                parts.setdefault(kind, []).append(ModalityBatch(items.values, items.owner + offset))
            offset += len(b)
        for kind, items in parts.items():
            shapes = {tuple(i.values.shape[1:]) for i in items}
            if len(shapes) > 1:
                raise ValueError(f"PromptBatch.concat: {kind} items of different shapes {sorted(shapes)}")
            modalities[kind] = ModalityBatch(
                torch.cat([i.values for i in items]), torch.cat([i.owner for i in items])
            )
        refs = [b.references for b in batches]
        return PromptBatch(
            ids=[x for b in batches for x in b.ids],
            texts=[x for b in batches for x in b.texts],
            modalities=modalities,
            targets=[x for b in batches for x in b.targets],
            domains=[x for b in batches for x in b.domains],
            datasets=[x for b in batches for x in b.datasets],
            domain_ids=torch.cat([b.domain_ids for b in batches]),
            references=None if any(r is None for r in refs) else [x for r in refs for x in r],
            origins=[x for b in batches for x in b.origins] if all(b.origins for b in batches) else [],
            stream_index=batches[0].stream_index,
        )


@dataclass
class RolloutBatch:
    """The N = P * n sampled responses of one rollout, grouped by prompt.

    Attributes:
        prompt_index: ``[N]`` long, which prompt (= which group) each response answers.
        response_ids: ``[N, R]`` long, sampled token ids, right-padded with the pad id.
        response_mask: ``[N, R]`` bool, True on real response tokens (EOS included when sampled).
        texts: ``N`` decoded responses (special tokens removed).
        engine_logprobs: ``[N, R]`` float, the engine's log-prob of each sampled token, or None.
        truncated: ``[N]`` bool, True where a response hit ``max_new_tokens`` without an EOS, or None.
    """

    prompt_index: Tensor
    response_ids: Tensor
    response_mask: Tensor
    texts: list[str]
    engine_logprobs: Tensor | None = None
    truncated: Tensor | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def select(self, rows: Tensor, prompt_index: Tensor) -> RolloutBatch:
        """The given responses with new prompt indices (after :meth:`PromptBatch.select`).

        Args:
            rows: ``[N']`` long, response rows to keep, in order.
            prompt_index: ``[N']`` long, their prompt index in the selected prompt batch.
        """
        rows = rows.to(self.response_ids.device)
        return RolloutBatch(
            prompt_index=prompt_index.to(self.prompt_index.device),
            response_ids=self.response_ids[rows],
            response_mask=self.response_mask[rows],
            texts=[self.texts[i] for i in rows.tolist()],
            engine_logprobs=self.engine_logprobs[rows] if self.engine_logprobs is not None else None,
            truncated=self.truncated[rows] if self.truncated is not None else None,
        )

    @staticmethod
    def concat(parts: list[tuple[RolloutBatch, int]], pad_id: int) -> RolloutBatch:
        """Responses of several rollouts, in order, right-padded to the longest (``R = max R_k``).

        Args:
            parts: ``(rollout, prompt offset)`` pairs: each rollout's prompt indices are shifted by its offset
                (the number of prompts of the batches before it).
            pad_id: token id that pads ``response_ids`` (masked out).
        """
        if not parts:
            raise ValueError("RolloutBatch.concat: no rollouts")
        if len(parts) == 1 and parts[0][1] == 0:
            return parts[0][0]
        width = max(r.response_ids.shape[1] for r, _ in parts)

        def pad(x: Tensor, value: float | int | bool) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        with_lp = all(r.engine_logprobs is not None for r, _ in parts)
        with_tr = all(r.truncated is not None for r, _ in parts)
        return RolloutBatch(
            prompt_index=torch.cat([r.prompt_index + off for r, off in parts]),
            response_ids=torch.cat([pad(r.response_ids, pad_id) for r, _ in parts]),
            response_mask=torch.cat([pad(r.response_mask, False) for r, _ in parts]),
            texts=[t for r, _ in parts for t in r.texts],
            engine_logprobs=torch.cat([pad(r.engine_logprobs, 0.0) for r, _ in parts]) if with_lp else None,
            truncated=torch.cat([r.truncated for r, _ in parts]) if with_tr else None,
        )


@dataclass
class SamplingParams:
    """How a rollout engine samples.

    Attributes:
        n: responses per prompt (group size).
        max_new_tokens: response length cap.
        temperature: sampling temperature; 0 means greedy.
        top_p: nucleus sampling mass.
        top_k: top-k cutoff; -1 disables.
        seed: base seed for reproducible sampling, or None.
    """

    n: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field when these settings cannot be honoured by an engine."""
        for bad, field, rule in (
            (self.n < 1, "n", "must be >= 1"),
            (self.max_new_tokens < 1, "max_new_tokens", "must be >= 1"),
            (self.temperature < 0, "temperature", "must be >= 0"),
            (not 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k == 0 or self.top_k < -1, "top_k", "must be -1 (off) or >= 1"),
        ):
            if bad:
                raise ValueError(f"SamplingParams.{field} {rule}, got {getattr(self, field)}")


Metrics = dict[str, Any]
