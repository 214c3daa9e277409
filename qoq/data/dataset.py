"""Loaded samples of clinical records, their prompt texts, SFT references, and the collate into batches.

A record's images, video frames (cines and 3-D volumes) and ECGs are loaded with
:mod:`qoq.data.loaders` and resized with :mod:`qoq.data.transforms`; its ground-truth boxes and mask are
mapped into the resized frame, so rewards score regions in the pixels the model saw. A file that
cannot be read raises :class:`~qoq.data.errors.DataError` naming it, or, with ``skip_invalid``, is
counted and its record dropped from the batch: never replaced by a blank image or a zero ECG.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from qoq.data.errors import DataError, SkipCounter
from qoq.data.loaders import ECGSpec, read_ecg, read_frames, read_image
from qoq.data.records import Record
from qoq.data.transforms import frames_to_tensor, load_mask, resize_image, resize_mask, scale_boxes
from qoq.rl.rewards import RESPONSE_FORMAT
from qoq.types import ModalityBatch, PromptBatch, RewardTarget

log = logging.getLogger(__name__)

#: Modality kind of each record path field, in the order items are collated.
MODALITY_FIELDS: dict[str, str] = {"image": "images", "video": "videos", "ecg": "time_series"}


@dataclass
class Sample:
    """One record, loaded.

    Attributes:
        record: the record.
        text: the user message (:func:`prompt_text`).
        items: modality kind -> loaded items in placeholder order: image ``[3, s, s]``, video
            ``[F, 3, s, s]``, ecg ``[leads, T]``; kinds without items are absent.
        target: answer, label set, and boxes / mask in the resized frame.
        reference: the SFT target response (:func:`reference_response`).
        stream_index: position of the batch this sample was drawn for, or -1.
    """

    record: Record
    text: str
    items: dict[str, list[Tensor]]
    target: RewardTarget
    reference: str
    stream_index: int = -1


def prompt_text(record: Record, instruction: str | None = RESPONSE_FORMAT) -> str:
    """The user message of a record: its problem, then the response-format instruction.

    Args:
        record: the record.
        instruction: the response-format instruction; default :data:`qoq.rl.rewards.RESPONSE_FORMAT`
            (the paper's prompt contract). None or "" appends nothing.

    Returns:
        ``record.problem`` + a blank line + ``instruction``.
    """
    return f"{record.problem}\n\n{instruction}" if instruction else record.problem


def reference_response(record: Record, boxes: Tensor | None) -> str:
    """The SFT target of a record, in the prompt contract (ALGORITHMS.md section 4).

    A short ``<think>`` block, a ```json list of ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` (``[]``
    when the record has no region), and the answer in ``\\boxed{}`` (several joined by ", ").

    Args:
        record: the record.
        boxes: ``[K, 4]`` ground-truth boxes in the pixels the model sees (resized frame), or None.

    Returns:
        The response text.
    """
    answer = ", ".join(record.answer)
    regions = (
        []
        if boxes is None
        else [{"bbox_2d": [round(float(v)) for v in box], "label": answer} for box in boxes.tolist()]
    )
    think = f"The findings fit {answer}."  # short: the demo's tiny policies roll out on CPU
    return f"<think>{think}</think>\n```json\n{json.dumps(regions)}\n```\n\\boxed{{{answer}}}"


class ClinicalDataset(Dataset):
    """Records loaded into tensors, one :class:`Sample` per index.

    Args:
        records: the records (paths absolute, as :func:`qoq.data.manifest.read_manifest` gives them).
        image_size: side of the square images and video frames, in pixels.
        num_frames: frames sampled evenly from each video / volume.
        ecg_spec: leads, rate and duration of every ECG item.
        skip_invalid: on a read failure, count it in ``counter``, log it and return None (the collate
            drops the record) instead of raising; a record that failed once is not read (nor counted)
            again.
        counter: where skips are counted (a fresh one when None). With DataLoader workers each worker
            counts in its own copy.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_size: int = 64,
        num_frames: int = 4,
        ecg_spec: ECGSpec = ECGSpec(),  # noqa: B008 - frozen, safe to share
        skip_invalid: bool = False,
        counter: SkipCounter | None = None,
        instruction: str | None = RESPONSE_FORMAT,
    ) -> None:
        if image_size < 1 or num_frames < 1:
            raise ValueError(f"image_size and num_frames must be >= 1, got {image_size}, {num_frames}")
        self.records = list(records)
        self.image_size = image_size
        self.num_frames = num_frames
        self.ecg_spec = ecg_spec
        self.skip_invalid = skip_invalid
        self.counter = counter if counter is not None else SkipCounter()
        self.instruction = instruction
        self._failed: set[str] = set()  # ids of records that could not be read (skip_invalid)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample | None:
        record = self.records[index]
        if record.id in self._failed:
            return None
        try:
            return self.load(record)
        except DataError as err:
            if not self.skip_invalid:
                raise
            self._failed.add(record.id)
            self.counter.add(err)
            log.warning("skipping record %r: %s", record.id, err)
            return None

    def load(self, record: Record) -> Sample:
        """Load one record.

        Args:
            record: the record.

        Returns:
            The sample.

        Raises:
            DataError: naming the file that cannot be read (or whose mask does not fit its image).
        """
        size = self.image_size
        items: dict[str, list[Tensor]] = {}
        boxes = mask = None
        for i, path in enumerate(record.images):
            image = read_image(path)  # [H, W, 3] uint8
            tensor, scale = resize_image(image, size)  # [3, s, s]
            items.setdefault("image", []).append(tensor)
            if i == 0:  # ground truth refers to the first image
                if record.bbox:
                    boxes = scale_boxes(record.bbox, scale)  # [K, 4]
                if record.segmentation_path is not None:
                    raw = load_mask(record.segmentation_path)  # [H, W] bool
                    if raw.shape != image.shape[:2]:
                        raise DataError(
                            "bad_shape",
                            f"mask is {list(raw.shape)}, its image {list(image.shape[:2])}",
                            path=record.segmentation_path,
                            field="segmentation_path",
                        )
                    mask = resize_mask(raw, size)  # [s, s]
        for path in record.videos:
            items.setdefault("video", []).append(frames_to_tensor(read_frames(path, self.num_frames), size))
        for path in record.time_series:
            items.setdefault("ecg", []).append(torch.from_numpy(read_ecg(path, self.ecg_spec)))  # [leads, T]
        frame = (size, size) if record.images else None  # the resized first image: the boxes' frame
        target = RewardTarget(
            answer=record.answer, labels=record.labels, boxes=boxes, mask=mask, image_size=frame
        )
        return Sample(record, prompt_text(record, self.instruction), items, target, reference_response(record, boxes))


def collate(samples: Sequence[Sample | None], domain_vocab: Sequence[str]) -> PromptBatch:
    """Stack samples into a :class:`~qoq.types.PromptBatch` (None entries, i.e. skipped records, dropped).

    Args:
        samples: loaded samples, in prompt order.
        domain_vocab: the domain vocabulary ``domain_ids`` index (e.g. :data:`qoq.data.domains.DOMAINS`).

    Returns:
        The batch; ``modalities`` holds only the kinds present, each with its owner indices, and
        ``stream_index`` is the samples' common stream index (-1 when they carry none).

    Raises:
        DataError: ``"empty_batch"`` when every sample was skipped.
        ValueError: a domain outside ``domain_vocab``, or items of one kind with different shapes.
    """
    kept = [s for s in samples if s is not None]
    if not kept:
        raise DataError(
            "empty_batch", f"all {len(samples)} records of this batch were skipped (see the skip counter)"
        )
    vocab = {d: i for i, d in enumerate(domain_vocab)}
    modalities: dict[str, ModalityBatch] = {}
    for kind in MODALITY_FIELDS:
        values = [(p, t) for p, s in enumerate(kept) for t in s.items.get(kind, [])]
        if not values:
            continue
        shapes = {tuple(t.shape) for _, t in values}
        if len(shapes) > 1:
            raise ValueError(
                f"{kind} items of different shapes {sorted(shapes)} in one batch "
                f"(records {[s.record.id for s in kept]})"
            )
        modalities[kind] = ModalityBatch(
            values=torch.stack([t for _, t in values]),  # [M, ...]
            owner=torch.tensor([p for p, _ in values], dtype=torch.long),  # [M]
        )
    unknown = sorted({s.record.domain for s in kept} - set(vocab))
    if unknown:
        raise ValueError(f"domains {unknown} are not in the domain vocabulary {list(domain_vocab)}")
    streams = {s.stream_index for s in kept}
    return PromptBatch(
        ids=[s.record.id for s in kept],
        texts=[s.text for s in kept],
        modalities=modalities,
        targets=[s.target for s in kept],
        domains=[s.record.domain for s in kept],
        datasets=[s.record.dataset for s in kept],
        domain_ids=torch.tensor([vocab[s.record.domain] for s in kept], dtype=torch.long),  # [P]
        references=[s.reference for s in kept],
        origins=[s.record.origin for s in kept],
        stream_index=streams.pop() if len(streams) == 1 else -1,
    )
