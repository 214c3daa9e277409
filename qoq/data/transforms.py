"""Resizing images, frames, boxes and masks together, so ground truth stays in the frame the model saw.

Images are resized to a square with a plain (non-letterboxed) resize: every pixel of the image is
kept and no padding tokens are spent, at the cost of the aspect ratio. Boxes and masks are mapped with
the same per-axis scale, so a box drawn on the resized image covers the same anatomy.

Box coordinates are continuous pixel-edge coordinates ``x1, y1, x2, y2`` (a box around pixel column
``c`` spans ``[c, c + 1)``), which is why scaling them by ``size / W`` and ``size / H`` is exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qoq.data.errors import DataError


def resize_image(img: np.ndarray, size: int) -> tuple[Tensor, tuple[float, float]]:
    """Resize an RGB image to ``size x size`` (bilinear, antialiased) and scale it to ``[0, 1]``.

    Args:
        img: ``[H, W, 3]`` uint8.
        size: output side in pixels.

    Returns:
        ``[3, size, size]`` float32 in ``[0, 1]``, and the scale ``(sx, sy) = (size / W, size / H)``
        that maps original pixel coordinates to resized ones (see :func:`scale_boxes`).
    """
    _check_rgb(img, ndim=3)
    h, w = img.shape[:2]
    return _resize(torch.from_numpy(np.ascontiguousarray(img))[None], size)[0], (size / w, size / h)


def frames_to_tensor(frames: np.ndarray, size: int) -> Tensor:
    """Resize a stack of RGB frames like :func:`resize_image`.

    Args:
        frames: ``[F, H, W, 3]`` uint8.
        size: output side in pixels.

    Returns:
        ``[F, 3, size, size]`` float32 in ``[0, 1]``.
    """
    _check_rgb(frames, ndim=4)
    return _resize(torch.from_numpy(np.ascontiguousarray(frames)), size)


def _resize(frames: Tensor, size: int) -> Tensor:
    x = frames.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # [F, 3, H, W]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp_(0.0, 1.0)


def _check_rgb(array: np.ndarray, ndim: int) -> None:
    if (
        not isinstance(array, np.ndarray)
        or array.dtype != np.uint8
        or array.ndim != ndim
        or array.shape[-1] != 3
    ):
        shape = list(getattr(array, "shape", []))
        raise ValueError(
            f"expected a {ndim}-D uint8 array ending in 3 channels, got {shape} {getattr(array, 'dtype', '')}"
        )


def scale_boxes(boxes: Tensor | np.ndarray | Sequence[Sequence[float]], scale: tuple[float, float]) -> Tensor:
    """Map boxes from original to resized pixels.

    Args:
        boxes: ``[K, 4]`` as ``x1, y1, x2, y2`` (K may be 0).
        scale: ``(sx, sy)`` from :func:`resize_image`.

    Returns:
        ``[K, 4]`` float32.
    """
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if not isinstance(boxes, Tensor) else boxes)
    b = b.to(torch.float32).reshape(-1, 4)  # [K, 4]
    sx, sy = scale
    return b * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)


def resize_mask(mask: np.ndarray | Tensor, size: int) -> Tensor:
    """Resize a binary mask to ``size x size`` with nearest-neighbour sampling (pixel centres).

    Args:
        mask: ``[H, W]`` bool (or 0/1).
        size: output side in pixels.

    Returns:
        ``[size, size]`` bool.
    """
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, Tensor) else mask)
    if m.ndim != 2:
        raise ValueError(f"expected a [H, W] mask, got {list(m.shape)}")
    m = m.to(torch.float32)[None, None]  # [1, 1, H, W]
    return F.interpolate(m, size=(size, size), mode="nearest-exact")[0, 0] > 0.5


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a ground-truth mask as a boolean array.

    PNG and other lossless images: any non-zero pixel (of any channel) is foreground; JPEG masks
    (lossy, so noisy near 0): pixels >= 128. ``.npy``: any non-zero value.

    Args:
        path: the mask file.

    Returns:
        ``[H, W]`` bool.

    Raises:
        DataError: ``"missing_file"``, ``"unreadable_file"``, ``"bad_shape"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("missing_file", "mask not found", path=path)
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError("unreadable_file", f"cannot read mask ({err})", path=path) from None
        if arr.ndim != 2:
            raise DataError("bad_shape", f"mask of shape {list(arr.shape)}, expected [H, W]", path=path)
        return arr != 0
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            lossy = img.format == "JPEG"
            gray = img.mode in ("1", "L", "I", "I;16", "F")
            arr = np.asarray(img) if gray else np.asarray(img.convert("RGB")).max(axis=-1)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise DataError(
            "unreadable_file", f"cannot decode mask ({err.__class__.__name__})", path=path
        ) from None
    return arr >= 128 if lossy else arr > 0


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The tightest box around a mask's foreground, in pixel-edge coordinates.

    Args:
        mask: ``[H, W]`` bool.

    Returns:
        ``(x1, y1, x2, y2)`` with ``x2 = last column + 1``, or None for an empty mask.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)
