"""Rewards: pure functions of a response's text and its :class:`~qoq.types.RewardTarget` (ALGORITHMS.md 4).

Response contract (:data:`RESPONSE_FORMAT`): reasoning in ``<think>...</think>``; salient regions as a
```json list of ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` in pixels of the image the model saw;
the final answer in ``\\boxed{...}``. :func:`extract_answer` is the one answer extractor, shared by the
training reward and evaluation.

Box convention (one for prompts, ground truth, rewards, reports): continuous pixel-edge coordinates
``x1, y1, x2, y2`` of the *resized* image the model saw (origin at its top-left corner, x to the right,
y down, a box around pixel column c spans [c, c + 1)), never 0-1 or 0-1000. Ground truth is converted into
it once, at the data edge (:func:`qoq.data.transforms.scale_boxes`, :func:`~qoq.data.transforms.resize_mask`).

Box-reward hacking guard (:class:`BoxGuard`, on by default): with the paper's max over predicted boxes, a
policy can list many boxes, or one box over the whole image. Only the first ``max_boxes`` boxes are scored,
and a box covering more than ``max_coverage`` of the image scores 0 unless the ground-truth region itself
is that large. ``RewardFn(box_guard=None)`` is the paper's unguarded reward.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor

from qoq.types import RewardTarget

Box = tuple[float, float, float, float]

#: Instruction appended to prompts: the format every reward parses.
RESPONSE_FORMAT = (
    "First think step by step inside <think> </think> tags. Then list the image regions that support "
    "your answer in a ```json code block, as a list of objects "
    '{"bbox_2d": [x1, y1, x2, y2], "label": "..."} in pixel coordinates of the image '
    "(an empty list [] when no region applies). Finally give the answer inside \\boxed{}, choosing from "
    "the listed options; separate several answers with commas."
)

#: The paper's weights (accuracy 0.6, IoU 0.2, format 0.2).
PAPER_WEIGHTS: Mapping[str, float] = MappingProxyType({"accuracy": 0.6, "iou": 0.2, "format": 0.2})
#: The released code's weights; use with ``format_mode="graded"``: accuracy (F1) 0.5, IoU 0.3, graded
#: format 0.1, and 0.1 for :func:`length_reward`.
RELEASED_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"accuracy": 0.5, "iou": 0.3, "format": 0.1, "length": 0.1}
)

_BOXED = re.compile(r"\\boxed\s*\{")
_LATEX_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_JSON_BLOCK = re.compile(r"```json\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_CHUNK_SPLIT = re.compile(r"[,;]")
_AND_SPLIT = re.compile(r"\s+(?:and|&)\s+|\s*&\s*", re.IGNORECASE)
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


# -------------------------------------------------------------------------------------------- answer
def extract_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` (nested braces kept), or None.

    Args:
        text: a response.

    Returns:
        The stripped content of the last ``\\boxed{`` whose braces close, or None if there is none.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_reasoning(text: str) -> str | None:
    """The content of the first ``<think>...</think>`` block, stripped, or None."""
    match = _THINK.search(text)
    return match.group(1).strip() if match else None


def normalize_label(text: str) -> str:
    """Case-, whitespace- and punctuation-insensitive form of a label (LaTeX ``\\text{}`` unwrapped)."""
    prev = None
    while prev != text:
        prev, text = text, _LATEX_WRAPPER.sub(r"\1", text)
    return " ".join(text.lower().translate(_PUNCT).split())


def _label_index(labels: Sequence[str], synonyms: Mapping[str, str] | None) -> dict[str, str]:
    """normalised form (label or synonym) -> canonical label."""
    index = {normalize_label(lab): lab for lab in labels}
    for alias, target in (synonyms or {}).items():
        canonical = index.get(normalize_label(target))
        if canonical is not None:
            index.setdefault(normalize_label(alias), canonical)
    return index


def extract_answer(
    text: str, labels: Sequence[str], synonyms: Mapping[str, str] | None = None
) -> frozenset[str]:
    """The set of closed-set labels a response answers (the one extractor for training and evaluation).

    The last ``\\boxed{}`` is split into chunks on commas and semicolons; a chunk that is not itself a
    label is split further on "and" / "&". Each piece is normalised (:func:`normalize_label`), mapped
    through ``synonyms`` and kept only if it names one of ``labels``.

    Args:
        text: a response.
        labels: the dataset's closed label set (canonical spellings).
        synonyms: alias -> label (compared normalised); aliases of labels outside ``labels`` are ignored.

    Returns:
        The canonical labels found (empty when there is no box or nothing matches).
    """
    content = extract_boxed(text)
    if content is None:
        return frozenset()
    index = _label_index(labels, synonyms)
    whole = index.get(normalize_label(content))
    if whole is not None:
        return frozenset({whole})
    found = set()
    for chunk in _CHUNK_SPLIT.split(content):
        hit = index.get(normalize_label(chunk))
        pieces = (
            [hit] if hit is not None else [index.get(normalize_label(p)) for p in _AND_SPLIT.split(chunk)]
        )
        found.update(p for p in pieces if p is not None)
    return frozenset(found)


def set_f1(pred: frozenset[str] | set[str], gold: frozenset[str] | set[str]) -> float:
    """F1 between two label sets: 2|P & G| / (|P| + |G|); 1 when both are empty.

    Args:
        pred: predicted labels.
        gold: ground-truth labels.
    """
    if not pred and not gold:
        return 1.0
    return 2.0 * len(set(pred) & set(gold)) / (len(pred) + len(gold))


def accuracy_reward(text: str, target: RewardTarget, synonyms: Mapping[str, str] | None = None) -> float:
    """Set-F1 of the extracted answer against the target's label set (1 or 0 for single labels).

    Args:
        text: a response.
        target: ground truth (its answer is canonicalised through the same label index).
        synonyms: alias -> label.
    """
    index = _label_index(target.labels, synonyms)
    gold = frozenset(index.get(normalize_label(a), a) for a in target.answer)
    return set_f1(extract_answer(text, target.labels, synonyms), gold)


# ----------------------------------------------------------------------------------------------- boxes
def _as_box(value: Any) -> Box | None:
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return None
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _boxes_in(obj: Any) -> list[Box]:
    if isinstance(obj, dict):
        for key in ("bbox_2d", "bbox"):
            if key in obj:
                box = _as_box(obj[key])
                return [box] if box is not None else []
        return []
    if isinstance(obj, (list, tuple)):
        box = _as_box(obj)
        if box is not None:  # a bare [x1, y1, x2, y2]
            return [box]
        return [b for item in obj if isinstance(item, (dict, list, tuple)) for b in _boxes_in(item)]
    return []


def parse_boxes(text: str) -> list[Box]:
    """Boxes of every ```json block that parses.

    Accepted forms: a list of ``{"bbox_2d" | "bbox": [x1, y1, x2, y2], ...}`` objects, one such object,
    a bare ``[x1, y1, x2, y2]`` or a list of them. Blocks that do not parse and entries that are not four
    finite numbers are ignored; corners are reordered so that x1 <= x2 and y1 <= y2.

    Args:
        text: a response.

    Returns:
        The boxes in order of appearance.
    """
    boxes: list[Box] = []
    for block in _JSON_BLOCK.findall(text):
        try:
            obj = json.loads(block)
        except ValueError:
            continue
        boxes.extend(_boxes_in(obj))
    return boxes


def _box_tensor(boxes: Sequence[Box] | Tensor) -> Tensor:
    t = torch.as_tensor(boxes, dtype=torch.float64) if not isinstance(boxes, Tensor) else boxes.double()
    return t.reshape(-1, 4)


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)  # [P]


def box_iou(pred: Sequence[Box] | Tensor, gt: Sequence[Box] | Tensor) -> Tensor:
    """Pairwise IoU of axis-aligned boxes (continuous coordinates, area = width * height).

    Args:
        pred: ``[P, 4]`` boxes ``x1, y1, x2, y2``.
        gt: ``[G, 4]`` boxes.

    Returns:
        ``[P, G]`` float64 IoU (0 where the union is empty).
    """
    a, b = _box_tensor(pred), _box_tensor(gt)  # [P, 4], [G, 4]
    wh = (
        torch.minimum(a[:, None, 2:], b[None, :, 2:]) - torch.maximum(a[:, None, :2], b[None, :, :2])
    ).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]  # [P, G]
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def box_mask_iou(pred: Sequence[Box] | Tensor, mask: Tensor) -> Tensor:
    """IoU of each box, rasterised on the mask's pixel grid, with the mask.

    Pixel (row i, column j) belongs to a box when its centre (j + 0.5, i + 0.5) lies in
    [x1, x2) x [y1, y2), so an integer box covers exactly (x2 - x1) * (y2 - y1) pixels.

    Args:
        pred: ``[P, 4]`` boxes in the mask's pixel frame.
        mask: ``[H, W]`` ground-truth mask (nonzero = inside).

    Returns:
        ``[P]`` float64 IoU (0 where the union is empty).
    """
    boxes, gt = _box_tensor(pred), mask.bool()  # [P, 4], [H, W]
    h, w = gt.shape
    cx = torch.arange(w, dtype=torch.float64) + 0.5  # [W]
    cy = torch.arange(h, dtype=torch.float64) + 0.5  # [H]
    in_x = (cx[None] >= boxes[:, 0:1]) & (cx[None] < boxes[:, 2:3])  # [P, W]
    in_y = (cy[None] >= boxes[:, 1:2]) & (cy[None] < boxes[:, 3:4])  # [P, H]
    raster = in_y[:, :, None] & in_x[:, None, :]  # [P, H, W]
    inter = (raster & gt).sum((1, 2)).double()
    union = raster.sum((1, 2)).double() + gt.sum().double() - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


@dataclass(frozen=True)
class BoxGuard:
    """Limits on what the IoU reward scores, against box-reward hacking (see the module docstring).

    Args:
        max_boxes: only the first this many predicted boxes (in order of appearance) are scored; None: all.
        max_coverage: a box covering more than this fraction of the image (after clipping to it) scores 0,
            unless the ground-truth region (the mask, or its largest box) covers at least as much; None: no
            limit. Needs the image size
            (the mask's, or :attr:`~qoq.types.RewardTarget.image_size`); without it the limit is skipped.
    """

    max_boxes: int | None = 4
    max_coverage: float | None = 0.5

    def __post_init__(self) -> None:
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ValueError(f"BoxGuard.max_boxes must be >= 1 or None, got {self.max_boxes}")
        if self.max_coverage is not None and not 0 < self.max_coverage <= 1:
            raise ValueError(f"BoxGuard.max_coverage must be in (0, 1] or None, got {self.max_coverage}")


def box_coverage(boxes: Sequence[Box] | Tensor, image_size: tuple[int, int]) -> Tensor:
    """Fraction of the image each box covers, after clipping it to the image.

    Args:
        boxes: ``[P, 4]`` boxes in the image's pixel frame.
        image_size: ``(H, W)`` of the image.

    Returns:
        ``[P]`` float64 in [0, 1].
    """
    h, w = image_size
    b = _box_tensor(boxes)
    limits = b.new_tensor([w, h, w, h])
    clipped = torch.minimum(b.clamp(min=0), limits)  # [P, 4] inside the image
    return _area(clipped) / float(h * w)


def iou_reward(
    pred_boxes: Sequence[Box] | Tensor,
    gt_boxes: Tensor | None = None,
    gt_mask: Tensor | None = None,
    reduce: Literal["max", "mean"] = "max",
    guard: BoxGuard | None = None,
    image_size: tuple[int, int] | None = None,
) -> float:
    """Region reward: each predicted box's IoU with the mask, or its best IoU over the GT boxes.

    Args:
        pred_boxes: ``[P, 4]`` predicted boxes (0 reward when there are none).
        gt_boxes: ``[K, 4]`` ground-truth boxes, or None.
        gt_mask: ``[H, W]`` ground-truth mask, or None (used in preference to boxes when given).
        reduce: over predicted boxes: ``"max"`` (paper) or ``"mean"`` (released code, without its bug).
        guard: the hacking guard; None scores every box as the paper does.
        image_size: ``(H, W)`` of the image the boxes refer to; default the mask's shape.

    Returns:
        The reward in [0, 1].
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    pred = _box_tensor(pred_boxes)
    if guard is not None and guard.max_boxes is not None:
        pred = pred[: guard.max_boxes]
    if gt_mask is not None:
        per_box = box_mask_iou(pred, gt_mask) if len(pred) else torch.zeros(0)
    elif gt_boxes is not None and len(gt_boxes) > 0:
        per_box = box_iou(pred, gt_boxes).amax(dim=1) if len(pred) else torch.zeros(0)
    else:
        raise ValueError("iou_reward needs gt_boxes or gt_mask")
    if per_box.numel() == 0:
        return 0.0
    size = image_size if image_size is not None else (tuple(gt_mask.shape) if gt_mask is not None else None)
    if guard is not None and guard.max_coverage is not None and size is not None:
        if gt_mask is not None:
            gt_cover = float(gt_mask.bool().float().mean())
        else:
            gt_cover = float(box_coverage(gt_boxes, size).max())
        if gt_cover < guard.max_coverage:
            too_big = box_coverage(pred, size) > guard.max_coverage  # [P]
            per_box = torch.where(too_big, torch.zeros_like(per_box), per_box)
    return float(per_box.max() if reduce == "max" else per_box.mean())


# ---------------------------------------------------------------------------------------------- format
def _graded_json_score(text: str) -> float:
    """The released code's graded JSON score (re-implemented): 0.2 for a code fence, +0.1 if it is
    marked ``json``, +0.2 if the block parses, +0.1 if it is a list, +0.4 x the share of list items with
    a four-number ``bbox_2d`` and a ``label``."""
    score = 0.0
    if "```" not in text:
        return score
    score += 0.2 + (0.1 if "```json" in text.lower() else 0.0)
    match = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL | re.IGNORECASE)
    if match is None:
        return score
    try:
        obj = json.loads(match.group(1))
    except ValueError:
        return score
    score += 0.2
    if not isinstance(obj, list):
        return score
    score += 0.1
    if obj:
        valid = sum(
            isinstance(o, dict) and "label" in o and _as_box(o.get("bbox_2d")) is not None for o in obj
        )
        score += 0.4 * valid / len(obj)
    return score


def format_reward(text: str, mode: Literal["binary", "graded"] = "binary") -> float:
    """Whether the response follows :data:`RESPONSE_FORMAT`.

    Args:
        text: a response.
        mode: ``"binary"`` (paper): 1 if it has a ``<think>...</think>`` block, a ```json block that
            parses, and a ``\\boxed{}`` answer, else 0. ``"graded"`` (released code): the partial-credit
            JSON score in [0, 1] of :func:`_graded_json_score`.
    """
    if mode == "graded":
        return _graded_json_score(text)
    if mode != "binary":
        raise ValueError(f"format mode must be 'binary' or 'graded', got {mode!r}")
    has_think = _THINK.search(text) is not None

    def parses(block: str) -> bool:
        try:
            json.loads(block)
        except ValueError:
            return False
        return True

    has_json = any(parses(b) for b in _JSON_BLOCK.findall(text))
    return float(has_think and has_json and extract_boxed(text) is not None)


def length_reward(text: str) -> float:
    """The released code's length term: 0.001 per character, and 1 beyond 600 characters.

    Args:
        text: a response.
    """
    return 1.0 if len(text) > 600 else 0.001 * len(text)


# ------------------------------------------------------------------------------------------ RewardFn
@dataclass
class RewardOutput:
    """Rewards of a batch of responses.

    Attributes:
        total: ``[N]`` weighted reward.
        components: name -> ``[N]`` component value, NaN where it does not apply (IoU without a region).
        errors: number of component evaluations that raised (each scored 0).
        error_messages: the first few of those errors, ``"response i: name: Type: message"``.
    """

    total: Tensor
    components: dict[str, Tensor]
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


class RewardFn:
    """The weighted sum of accuracy, IoU and format rewards (ALGORITHMS.md section 4).

    total_i = S * sum_c(w_c v_c) / sum_c(w_c), the sums over the components that apply to response i and
    S the sum of all weights: a target without a box or mask has no IoU term and the other weights are
    scaled up to the same total (default weights: accuracy 0.75, format 0.25). A component that raises
    is scored 0, counted in ``errors`` and its message kept (first few). The accuracy, IoU and format
    components are always computed (for logging), whatever their weight. :data:`RELEASED_WEIGHTS` with
    ``format_mode="graded"``, ``iou_reduce="mean"`` and ``box_guard=None`` mirrors the released code.

    Args:
        weights: component -> weight, components among ``accuracy``, ``iou``, ``format``, ``length``;
            default the paper's ``{"accuracy": 0.6, "iou": 0.2, "format": 0.2}``.
        iou_reduce: ``"max"`` (paper) or ``"mean"`` over predicted boxes.
        box_guard: limits on the boxes the IoU reward scores (default: the first 4, none covering more
            than half the image unless the ground truth does); None is the paper's unguarded reward.
        format_mode: ``"binary"`` (paper) or ``"graded"`` (released).
        synonyms: alias -> label, used by the answer extractor.
        max_error_messages: how many error messages to keep.
    """

    KNOWN = ("accuracy", "iou", "format", "length")

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        iou_reduce: Literal["max", "mean"] = "max",
        box_guard: BoxGuard | None = BoxGuard(),
        format_mode: Literal["binary", "graded"] = "binary",
        synonyms: dict[str, str] | None = None,
        max_error_messages: int = 5,
    ):
        self.weights = dict(PAPER_WEIGHTS if weights is None else weights)
        unknown = set(self.weights) - set(self.KNOWN)
        if unknown:
            raise ValueError(f"unknown reward components {sorted(unknown)}; known: {list(self.KNOWN)}")
        if iou_reduce not in ("max", "mean"):
            raise ValueError(f"iou_reduce must be 'max' or 'mean', got {iou_reduce!r}")
        if format_mode not in ("binary", "graded"):
            raise ValueError(f"format_mode must be 'binary' or 'graded', got {format_mode!r}")
        self.iou_reduce, self.format_mode, self.box_guard = iou_reduce, format_mode, box_guard
        self.synonyms = dict(synonyms or {})
        self.max_error_messages = max_error_messages
        self.components = ["accuracy", "iou", "format"] + [c for c in self.weights if c == "length"]

    def component(self, name: str, text: str, target: RewardTarget) -> float:
        """One component's value for one response.

        Args:
            name: one of :attr:`KNOWN`.
            text: the response.
            target: its ground truth (must have a region for ``iou``).
        """
        if name == "accuracy":
            return accuracy_reward(text, target, self.synonyms)
        if name == "iou":
            return iou_reward(
                parse_boxes(text), target.boxes, target.mask, self.iou_reduce, self.box_guard, target.image_size
            )
        if name == "format":
            return format_reward(text, self.format_mode)
        if name == "length":
            return length_reward(text)
        raise ValueError(f"unknown reward component {name!r}; known: {list(self.KNOWN)}")

    def __call__(self, texts: Sequence[str], targets: Sequence[RewardTarget]) -> RewardOutput:
        """Score ``texts[i]`` against ``targets[i]``.

        Args:
            texts: ``N`` responses.
            targets: ``N`` targets (the prompt's target repeated for each of its rollouts).

        Returns:
            The rewards.
        """
        if len(texts) != len(targets):
            raise ValueError(f"RewardFn: {len(texts)} texts but {len(targets)} targets")
        values = {c: [math.nan] * len(texts) for c in self.components}
        errors, messages = 0, []
        for i, (text, target) in enumerate(zip(texts, targets)):
            for name in self.components:
                if name == "iou" and not target.has_region:
                    continue
                try:
                    values[name][i] = float(self.component(name, text, target))
                except Exception as err:  # noqa: BLE001 (a broken component must not stop training)
                    values[name][i] = 0.0
                    errors += 1
                    if len(messages) < self.max_error_messages:
                        messages.append(f"response {i}: {name}: {type(err).__name__}: {err}")
        components = {c: torch.tensor(v, dtype=torch.float32) for c, v in values.items()}  # [N] each
        total_weight = sum(self.weights.values())
        num = torch.zeros(len(texts), dtype=torch.float64)
        den = torch.zeros(len(texts), dtype=torch.float64)
        for name, w in self.weights.items():
            applies = ~components[name].isnan()
            num += torch.where(applies, w * components[name].double(), 0.0)
            den += torch.where(applies, w, 0.0)
        total = torch.where(den > 0, total_weight * num / den.clamp(min=1e-12), torch.zeros_like(num))
        return RewardOutput(total.float(), components, errors, messages)
