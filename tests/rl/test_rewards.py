"""Rewards: answer extraction, box parsing, IoU on hand-drawn boxes and masks, format, RewardFn."""

import math

import pytest
import torch

from qoq.rl.rewards import (
    RELEASED_WEIGHTS,
    RESPONSE_FORMAT,
    BoxGuard,
    RewardFn,
    box_coverage,
    box_iou,
    box_mask_iou,
    extract_answer,
    extract_boxed,
    format_reward,
    iou_reward,
    length_reward,
    parse_boxes,
    set_f1,
)
from qoq.types import RewardTarget

LABELS = ("Pneumonia", "Pleural Effusion", "Normal", "Atelectasis and collapse")
GOOD = (
    "<think>The left base is opaque.</think>\n"
    '```json\n[{"bbox_2d": [0, 0, 2, 2], "label": "opacity"}]\n```\n'
    "The answer is \\boxed{Pneumonia}."
)


# ------------------------------------------------------------------------------------------- answer
def test_extract_boxed_last_and_nested():
    assert extract_boxed("\\boxed{A} then \\boxed{\\text{B}}") == "\\text{B}"
    assert extract_boxed("x = \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{A} and a truncated \\boxed{B") == "A"  # last *complete* box
    assert extract_boxed("no answer here") is None
    assert extract_boxed("\\boxed {  spaced }") == "spaced"


def test_extract_answer_splits_normalises_and_filters():
    text = "\\boxed{pleural  effusion and PNEUMONIA.}"
    assert extract_answer(text, LABELS) == {"Pleural Effusion", "Pneumonia"}
    assert extract_answer("\\boxed{Normal; Cardiomegaly}", LABELS) == {"Normal"}  # outside the label set
    assert extract_answer("\\boxed{\\text{Normal}}", LABELS) == {"Normal"}
    assert extract_answer("\\boxed{atelectasis and collapse}", LABELS) == {"Atelectasis and collapse"}
    assert extract_answer("\\boxed{atelectasis and collapse, normal}", LABELS) == {
        "Atelectasis and collapse",
        "Normal",
    }
    assert extract_answer("Pneumonia", LABELS) == frozenset()  # no box
    syn = {"effusion": "Pleural Effusion", "nothing": "Unknown label"}
    assert extract_answer("\\boxed{Effusion & pneumonia}", LABELS, syn) == {"Pleural Effusion", "Pneumonia"}
    assert extract_answer("\\boxed{nothing}", LABELS, syn) == frozenset()


def test_set_f1():
    assert set_f1({"A"}, {"A"}) == 1.0
    assert set_f1({"A", "B"}, {"A"}) == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert set_f1(set(), {"A"}) == 0.0 and set_f1({"B"}, {"A"}) == 0.0
    assert set_f1(set(), set()) == 1.0


# -------------------------------------------------------------------------------------------- boxes
def test_parse_boxes_forms_and_malformed_entries():
    text = (
        '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox": [5, 6, 7, 8]}, {"bbox_2d": [1, 2, 3]},\n'
        ' {"bbox_2d": ["1", 2, 3, 4]}, {"label": "no box"}, 7]\n```\n'
        '```json\n{"bbox_2d": [9, 9, 1, 1], "label": "reversed corners"}\n```\n'
        '```json\n[{"bbox_2d": [1, 2, 3, 4]  \n```\n'  # broken JSON: ignored
        "```json\n[[0, 0, 1, 1], [2, 2, 3, 3]]\n```"
    )
    assert parse_boxes(text) == [(1, 2, 3, 4), (5, 6, 7, 8), (1, 1, 9, 9), (0, 0, 1, 1), (2, 2, 3, 3)]
    assert parse_boxes("no json at all") == []
    assert parse_boxes("```json\n[1, 2, 3, 4]\n```") == [(1, 2, 3, 4)]
    assert parse_boxes('```json\n{"bbox_2d": [0, 0, NaN, 1]}\n```') == []


def test_box_iou_by_hand():
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7
    iou = box_iou([(0, 0, 2, 2)], [(1, 1, 3, 3), (0, 0, 2, 2), (5, 5, 6, 6)])
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 1.0, 0.0]], dtype=torch.float64))
    assert float(box_iou([(1, 1, 1, 1)], [(1, 1, 1, 1)])) == 0.0  # empty union


def test_box_mask_iou_by_hand():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0:2, 0:2] = True  # 4 pixels in the top-left corner
    iou = box_mask_iou([(0, 0, 2, 2), (0, 0, 4, 4), (1, 1, 3, 3), (2.2, 2.2, 2.4, 2.4)], mask)
    # exact: 1; whole image: 4/16; [1,1,3,3] covers pixels (1..2, 1..2): 1 shared, union 7;
    # a sliver that covers no pixel centre: 0
    torch.testing.assert_close(iou, torch.tensor([1.0, 0.25, 1 / 7, 0.0], dtype=torch.float64))


def test_iou_reward_reductions():
    preds = [(0, 0, 2, 2), (10, 10, 12, 12)]
    gt = torch.tensor([[0.0, 0, 2, 2]])
    assert iou_reward(preds, gt_boxes=gt) == 1.0
    assert iou_reward(preds, gt_boxes=gt, reduce="mean") == 0.5  # the released code's bug gave 0 here
    assert iou_reward([], gt_boxes=gt) == 0.0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    assert iou_reward([(0, 0, 4, 4)], gt_boxes=gt, gt_mask=mask) == 0.25  # the mask wins over boxes
    with pytest.raises(ValueError, match="gt_boxes or gt_mask"):
        iou_reward(preds)


def _json(*boxes) -> str:
    items = ", ".join(f'{{"bbox_2d": {list(b)}, "label": "x"}}' for b in boxes)
    return f"<think>t</think>\n```json\n[{items}]\n```\n\\boxed{{Pneumonia}}"


def test_box_coverage_clips_to_the_image():
    cover = box_coverage([(0, 0, 50, 100), (-100, -100, 500, 500), (90, 90, 110, 110)], (100, 100))
    torch.testing.assert_close(cover, torch.tensor([0.5, 1.0, 0.01], dtype=torch.float64))


def test_box_guard_against_hand_drawn_adversarial_outputs():
    """A 100 x 100 image: many boxes, one whole-image box, a box mostly off the image; honest boxes keep
    their reward."""
    size = (100, 100)
    small = torch.tensor([[10.0, 10, 30, 30]])  # covers .04
    large = torch.tensor([[0.0, 0, 60, 80]])  # covers .48
    guard = BoxGuard(max_boxes=4, max_coverage=0.5)

    def reward(boxes, gt, guard=guard):
        return iou_reward(parse_boxes(_json(*boxes)), gt_boxes=gt, guard=guard, image_size=size)

    # honest: IoU (18 * 18) / 400 = .81, guarded or not
    assert reward([(12, 12, 30, 30)], small) == pytest.approx(0.81)
    assert reward([(12, 12, 30, 30)], small, None) == pytest.approx(0.81)
    # spraying: eight decoys then the exact box: 1.0 under the paper's max, 0 once only 4 boxes count
    spray = [(50 + 5 * i, 50, 55 + 5 * i, 55) for i in range(8)] + [(10, 10, 30, 30)]
    assert reward(spray, small, None) == 1.0 and reward(spray, small) == 0.0
    # ...while an honest answer with its best box among the first four still scores
    assert reward([(50, 50, 55, 55), (10, 10, 30, 30)], small) == 1.0
    # one whole-image box against a region of .48 of the image: IoU .48 unguarded, 0 guarded
    assert reward([(0, 0, 100, 100)], large, None) == pytest.approx(0.48) and reward([(0, 0, 100, 100)], large) == 0.0
    # a huge box far beyond the image is clipped to it for the coverage: still the whole image
    assert reward([(-1e4, -1e4, 1e4, 1e4)], large) == 0.0
    # the right box for the large region is not penalised (it covers .48 < .5)
    assert reward([(0, 0, 60, 80)], large) == 1.0
    # a ground-truth region larger than the limit lifts it: a whole-image box scores its IoU .7
    big = torch.tensor([[0.0, 0, 100, 70]])
    assert reward([(0, 0, 100, 100)], big) == pytest.approx(0.7)
    # no image size and no mask: the coverage limit cannot apply, the box cap still does
    assert iou_reward([(0, 0, 100, 100)], gt_boxes=large, guard=guard) == pytest.approx(0.48)
    # masks: the image size is the mask's; a whole-image box against a 2 x 2 region of 4 x 4 scores 0
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    assert iou_reward([(0, 0, 4, 4)], gt_mask=mask, guard=guard) == 0.0
    assert iou_reward([(0, 0, 4, 4)], gt_mask=mask) == 0.25
    with pytest.raises(ValueError, match="max_boxes"):
        BoxGuard(max_boxes=0)
    with pytest.raises(ValueError, match="max_coverage"):
        BoxGuard(max_coverage=1.5)


def test_reward_fn_guards_boxes_by_default():
    gt = RewardTarget(answer=("Pneumonia",), labels=LABELS, boxes=torch.tensor([[0.0, 0, 60, 80]]), image_size=(100, 100))
    whole = _json((0, 0, 100, 100))
    assert float(RewardFn()([whole], [gt]).components["iou"][0]) == 0.0
    assert float(RewardFn(box_guard=None)([whole], [gt]).components["iou"][0]) == pytest.approx(0.48)


# ------------------------------------------------------------------------------------------- format
def test_format_binary():
    assert format_reward(GOOD) == 1.0
    assert format_reward(GOOD.replace("<think>", "")) == 0.0
    assert format_reward(GOOD.replace("[{", "[{{")) == 0.0  # JSON does not parse
    assert format_reward(GOOD.replace("\\boxed{Pneumonia}", "Pneumonia")) == 0.0


def test_format_graded_and_length():
    # fence .2 + json marker .1 + parses .2 + list .1 + .4 * (1 of 2 items valid) = .8
    text = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "x"}, {"bbox_2d": [1, 2]}]\n```'
    assert format_reward(text, "graded") == pytest.approx(0.8)
    assert format_reward("```\nnot json\n```", "graded") == pytest.approx(0.2)
    assert format_reward("plain", "graded") == 0.0
    assert length_reward("x" * 300) == pytest.approx(0.3) and length_reward("x" * 601) == 1.0


def test_response_format_mentions_the_contract():
    for piece in ("<think>", "```json", "bbox_2d", "\\boxed{}"):
        assert piece in RESPONSE_FORMAT


# ------------------------------------------------------------------------------------------ RewardFn
def target(answer=("Pneumonia",), boxes=None, mask=None):
    return RewardTarget(answer=answer, labels=LABELS, boxes=boxes, mask=mask)


def test_reward_fn_weights_and_renormalisation():
    fn = RewardFn()
    with_box = target(boxes=torch.tensor([[1.0, 1, 3, 3]]))  # IoU of [0,0,2,2] = 1/7
    wrong = GOOD.replace("{Pneumonia}", "{Normal}")
    out = fn([GOOD, GOOD, wrong], [with_box, target(), target()])
    # with a region: .6 * 1 + .2 * 1/7 + .2 * 1; without: (.6 * 1 + .2 * 1) / .8 = 1; wrong: .2 / .8 = .25
    torch.testing.assert_close(out.total, torch.tensor([0.8 + 0.2 / 7, 1.0, 0.25]))
    assert out.components["iou"][0] == pytest.approx(1 / 7) and math.isnan(out.components["iou"][1])
    assert out.components["accuracy"].tolist() == [1.0, 1.0, 0.0] and out.errors == 0


def test_reward_fn_counts_errors_and_scores_zero():
    bad_mask = torch.zeros(2, 4, 4, dtype=torch.bool)  # 3-D: rasterising against it raises
    fn = RewardFn(max_error_messages=1)
    out = fn([GOOD, GOOD], [target(mask=bad_mask), target(mask=bad_mask)])
    assert out.errors == 2 and len(out.error_messages) == 1
    assert out.error_messages[0].startswith("response 0: iou: ValueError")
    assert out.components["iou"].tolist() == [0.0, 0.0]
    torch.testing.assert_close(out.total, torch.tensor([0.8, 0.8]))


def test_reward_fn_released_preset_and_validation():
    fn = RewardFn(weights=RELEASED_WEIGHTS, format_mode="graded", iou_reduce="mean")
    out = fn([GOOD], [target()])
    # no region: accuracy 1, graded format 1 (fence, marker, parses, list, 1 valid item), length len/1000;
    # renormalised over .5 + .1 + .1 to the full weight 1.0
    length = len(GOOD) / 1000
    assert float(out.total[0]) == pytest.approx((0.5 + 0.1 + 0.1 * length) / 0.7, rel=1e-6)
    assert "length" in out.components
    with pytest.raises(ValueError, match="unknown reward components"):
        RewardFn(weights={"accuracy": 1.0, "fluency": 1.0})
    with pytest.raises(ValueError, match="texts"):
        RewardFn()(["a"], [])
