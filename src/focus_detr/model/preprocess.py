"""The network input of one decoded image: the test-time resize, in one place.

:func:`preprocess` is the only preprocessing path for inference: :meth:`FocusDETR.predict` (and so video
frames and ``focus-detr predict``), :func:`focus_detr.inference.explain` and the ONNX runner
(:meth:`focus_detr.export.OnnxDetector.prepare`) all call it. Its size rule,
:func:`focus_detr.ops.images.resized_shape`, is the one the evaluation transforms use too, so an image is
seen at the same size whether it is predicted, explained, exported or evaluated.

It takes already-decoded pixels (``[H, W, 3]`` uint8 RGB, what
:func:`focus_detr.data.image_io.to_rgb_array` returns for paths, URLs, PIL images and arrays); decoding
lives in ``data``. Normalisation by ``cfg.pixel_mean`` / ``cfg.pixel_std`` happens when images are batched
(:func:`focus_detr.ops.images.batch_images`, padding after normalisation as detectron2 does), and inside the
exported ONNX graph.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..config import FocusDETRConfig
from ..ops.images import resized_shape


def resize_shortest_edge(image: np.ndarray, short_side: int, max_size: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[h, w, 3]`` uint8 with ``(h, w) = resized_shape(H, W, short_side, max_size)``.

    PIL bilinear, as detectron2 resamples uint8 images (and as the evaluation transforms do); the input is
    returned as it is when the size does not change."""
    h, w = image.shape[:2]
    new_h, new_w = resized_shape(h, w, short_side, max_size)
    if (new_h, new_w) == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def preprocess(image: np.ndarray, sizes: FocusDETRConfig | tuple[int, int]) -> tuple[Tensor, tuple[int, int]]:
    """One decoded image -> ``(network input [3, h, w] uint8 RGB, original (H, W))``.

    Args:
        image: ``[H, W, 3]`` uint8 RGB array (decode other inputs with
            :func:`focus_detr.data.image_io.to_rgb_array` first).
        sizes: the model's config (its ``test_short_side`` / ``test_max_size``) or ``(short_side, max_size)``.

    The tensor owns its memory (never a view of ``image``); boxes predicted on it are mapped back to the
    original image by scaling with ``original / (h, w)`` (:meth:`FocusDETR.postprocess`).
    """
    if isinstance(sizes, FocusDETRConfig):
        short_side, max_size = sizes.test_short_side, sizes.test_max_size
    else:
        short_side, max_size = (int(v) for v in sizes)
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = (f"{type(image).__name__} of shape {tuple(image.shape)} and dtype {image.dtype}"
               if isinstance(image, np.ndarray) else type(image).__name__)
        raise ValueError(f"preprocess needs an [H, W, 3] uint8 RGB array (decode with "
                         f"focus_detr.data.image_io.to_rgb_array), got {got}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"preprocess needs a non-empty image, got shape {tuple(image.shape)}")
    original = (int(image.shape[0]), int(image.shape[1]))
    resized = resize_shortest_edge(image, short_side, max_size)
    tensor = torch.from_numpy(np.array(resized, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
    return tensor, original


__all__ = ["preprocess", "resize_shortest_edge"]
