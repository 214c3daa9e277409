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
    """

    answer: tuple[str, ...]
    labels: tuple[str, ...]
    boxes: Tensor | None = None
    mask: Tensor | None = None

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


Metrics = dict[str, Any]
