"""The reward curve: a moving average that skips NaN, and a titled plot with raw and smoothed lines."""

import math

from PIL import Image

from qoq.callbacks.curves import RewardCurve, moving_average


def test_moving_average_by_hand() -> None:
    out = moving_average([1.0, float("nan"), 3.0, 5.0], width=2)
    assert out[0] == 1.0 and out[1] == 1.0 and out[2] == 3.0 and out[3] == 4.0
    assert math.isnan(moving_average([float("nan")])[0])


def test_plot_is_written(tmp_path) -> None:
    curve = RewardCurve()
    for step in range(12):
        curve.steps.append(step)
        for key in curve.keys:
            curve.values[key].append(step / 12)
    curve._plot(tmp_path / "reward_curve.png", "demo")
    with Image.open(tmp_path / "reward_curve.png") as image:
        image.verify()
