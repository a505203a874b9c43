"""Image decoding and the detectron2 shortest-edge resize, shared by inference and the data pipeline."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """detectron2 ``ResizeShortestEdge`` rule: scale the shorter side to ``short_side`` unless the longer side
    would exceed ``max_size``; sizes rounded with ``int(x + 0.5)`` and kept >= 1 px."""
    scale = short_side / min(height, width)
    new_h, new_w = height * scale, width * scale
    if max(new_h, new_w) > max_size:
        rescale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * rescale, new_w * rescale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


def resize_shortest_edge(image: np.ndarray, short_side: int, max_size: int) -> np.ndarray:
    """Resize an ``[H, W, 3]`` uint8 array with PIL bilinear (as detectron2)."""
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, short_side, max_size)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def to_rgb_array(obj) -> np.ndarray:
    """PIL image, numpy array or path -> ``[H, W, 3]`` uint8 RGB (see ``focus_detr.data.io`` for details)."""
    from ..data.io import to_rgb_array as _to_rgb  # noqa: PLC0415  (single implementation lives in data.io)

    return _to_rgb(obj)
