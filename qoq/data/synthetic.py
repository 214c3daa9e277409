"""Procedurally generated mammograms and dermoscopy images whose labels are correct by construction.

No installable package ships usable mammography or dermoscopy images, so the embedded demo set draws
these two domains from the generators below. The images are cartoons of the real thing: they exercise
the pipeline (and give RL a learnable signal) but say nothing about clinical performance. Every record
built from them is marked ``origin="synthetic"`` and carries "synthetic" in its dataset and file names.

Labels describe what was drawn (morphology), never a diagnosis:

- mammography: no mass / circumscribed (round, smooth-margined) mass / spiculated mass;
- dermoscopy: symmetric lesion of one colour / asymmetric lesion of several colours.

The region (box and mask) is the drawn lesion, exact in the generated pixel frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from qoq.data.transforms import mask_box

MAMMO_LABELS: tuple[str, ...] = ("no mass", "circumscribed mass", "spiculated mass")
DERMOSCOPY_LABELS: tuple[str, ...] = ("symmetric single-colour lesion", "asymmetric multi-colour lesion")


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image with its ground truth.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB.
        label: the drawn class (one of the generator's label set).
        mask: ``[H, W]`` bool, the drawn lesion, or None when nothing was drawn.
        box: ``x1, y1, x2, y2`` pixel box of ``mask`` (x2/y2 exclusive), or None.
    """

    image: np.ndarray
    label: str
    mask: np.ndarray | None
    box: tuple[float, float, float, float] | None


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise ``[size, size]`` rescaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
    return (field - field.min()) / (np.ptp(field) + 1e-9)


def _radial_blob(
    size: int, cx: float, cy: float, radius: float, harmonics: list[tuple[int, float, float]]
) -> np.ndarray:
    """Bool mask ``[size, size]`` of the star-shaped region r <= radius * (1 + sum a_k cos(k t + p_k))."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dx, dy = xx - cx, yy - cy
    theta = np.arctan2(dy, dx)
    rim = np.ones_like(theta)
    for k, amp, phase in harmonics:
        rim += amp * np.cos(k * theta + phase)
    return np.hypot(dx, dy) <= radius * rim


def _check(label: str, labels: tuple[str, ...]) -> None:
    if label not in labels:
        raise ValueError(f"unknown synthetic label {label!r}; expected one of {labels}")


def synthetic_mammogram(rng: np.random.Generator, label: str, size: int = 256) -> SyntheticSample:
    """Draw a breast-shaped grey image with no mass, a circumscribed mass or a spiculated mass.

    Args:
        rng: the random generator (the only source of randomness).
        label: one of :data:`MAMMO_LABELS`.
        size: output side in pixels.

    Returns:
        The sample; ``mask``/``box`` are None for "no mass".
    """
    _check(label, MAMMO_LABELS)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    # Breast: half-ellipse against the chest wall at x = 0.
    a, b, cy = size * rng.uniform(0.7, 0.85), size * rng.uniform(0.4, 0.47), size * rng.uniform(0.47, 0.53)
    rho = np.sqrt((xx / a) ** 2 + ((yy - cy) / b) ** 2)
    breast = rho <= 1.0
    tissue = 0.25 + 0.35 * _smooth_noise(rng, size, size / 40) * np.clip(1.2 - rho, 0, 1)
    tissue += 0.06 * _smooth_noise(rng, size, 1.5)
    image = np.where(breast, tissue, 0.0)

    mask = None
    if label != "no mass":
        radius = size * rng.uniform(0.045, 0.075)
        # Centre well inside the breast (rho <= 0.6).
        t = rng.uniform(-0.9, 0.9)
        r = rng.uniform(0.25, 0.6)
        cx, cyy = a * r * np.cos(t), cy + b * r * np.sin(t)
        if label == "circumscribed mass":
            mask = _radial_blob(size, cx, cyy, radius, [(2, rng.uniform(0.0, 0.12), rng.uniform(0, 6.3))])
        else:
            core = _radial_blob(size, cx, cyy, radius * 0.75, [(5, 0.12, rng.uniform(0, 6.3))])
            spicules = np.zeros_like(core)
            for angle in rng.uniform(0, 2 * np.pi, int(rng.integers(8, 14))):
                length = radius * rng.uniform(1.4, 2.4)
                steps = np.linspace(0.0, length, int(length * 2))
                px = np.clip(np.round(cx + steps * np.cos(angle)), 0, size - 1).astype(int)
                py = np.clip(np.round(cyy + steps * np.sin(angle)), 0, size - 1).astype(int)
                spicules[py, px] = True
            mask = (core | ndimage.binary_dilation(spicules)) & breast
        density = ndimage.gaussian_filter(mask.astype(np.float64), 1.0)
        image = image + 0.45 * density
    if rng.random() < 0.5:  # left or right breast
        image, breast = image[:, ::-1], breast[:, ::-1]
        mask = None if mask is None else mask[:, ::-1]
    grey = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    mask = None if mask is None else np.ascontiguousarray(mask)
    return SyntheticSample(np.ascontiguousarray(rgb), label, mask, None if mask is None else mask_box(mask))


def synthetic_dermoscopy(rng: np.random.Generator, label: str, size: int = 256) -> SyntheticSample:
    """Draw a skin patch with a symmetric one-colour lesion or an asymmetric multi-colour lesion.

    Args:
        rng: the random generator (the only source of randomness).
        label: one of :data:`DERMOSCOPY_LABELS`.
        size: output side in pixels.

    Returns:
        The sample, with the lesion as ``mask`` and its box.
    """
    _check(label, DERMOSCOPY_LABELS)
    skin = np.array([222.0, 172.0, 142.0]) * rng.uniform(0.85, 1.05)
    texture = _smooth_noise(rng, size, 3.0)[..., None]
    image = skin * (0.92 + 0.12 * texture)  # [H, W, 3]

    cx, cy = size * rng.uniform(0.42, 0.58, 2)
    radius = size * rng.uniform(0.18, 0.26)
    if label == "symmetric single-colour lesion":
        mask = _radial_blob(size, cx, cy, radius, [(2, rng.uniform(0.0, 0.06), rng.uniform(0, 6.3))])
        colour = np.array([125.0, 82.0, 52.0]) * rng.uniform(0.8, 1.1)
        paint = np.broadcast_to(colour, image.shape)
    else:
        harmonics = [(k, rng.uniform(0.08, 0.2), rng.uniform(0, 6.3)) for k in (1, 2, 3, 5)]
        mask = _radial_blob(size, cx, cy, radius, harmonics)
        # Several colours by construction: angular sectors around the centre, borders made wavy by noise.
        palette = np.array([[110, 70, 45], [45, 30, 30], [95, 105, 135], [160, 70, 70]], dtype=np.float64)
        yy, xx = np.mgrid[0:size, 0:size]
        theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, 2 * np.pi) + 1.5 * _smooth_noise(rng, size, 8.0)
        sector = np.floor(theta / (2 * np.pi) * len(palette)).astype(int) % len(palette)
        paint = palette[sector]  # [H, W, 3]
    alpha = ndimage.gaussian_filter(mask.astype(np.float64), 1.2)[..., None]
    image = image * (1 - alpha) + paint * (0.9 + 0.15 * texture) * alpha
    # Dermatoscope vignette: dark outside the circular field of view.
    yy, xx = np.mgrid[0:size, 0:size]
    outside = np.hypot(xx - size / 2, yy - size / 2) > size * 0.5
    image[outside] = 15.0
    mask &= ~outside
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    return SyntheticSample(rgb, label, mask, mask_box(mask))
