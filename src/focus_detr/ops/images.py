"""Image geometry and batching shared by every path: the one test-time resize rule
(:func:`resized_shape`) and batching the way the official model does (normalise, then zero-pad
bottom/right). Torch and the standard library only; decoding lives in :mod:`focus_detr.data.image_io`,
the network-input preprocessing in :mod:`focus_detr.model.preprocess`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def resized_shape(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` of an ``height x width`` image under detectron2's ``ResizeShortestEdge`` rule.

    The shorter side becomes ``short_side`` (``scale = short_side / min(h, w)``); if the longer side would
    then exceed ``max_size`` the image is scaled so the longer side is exactly ``max_size``; sizes are
    rounded with ``int(x + 0.5)`` and kept >= 1 px (so 1 x 20000 images still give a valid image).

    This is the only copy of the rule: prediction and explanation
    (:func:`focus_detr.model.preprocess.preprocess`), the ONNX runner, video frames and the evaluation /
    training transforms (:class:`focus_detr.data.transforms.ResizeShortestEdge`) all call it.
    """
    h, w = float(height), float(width)
    scale = short_side / min(h, w)
    # The short side is set exactly (not h * scale, which may be off by one ulp), as detectron2 does.
    if h < w:
        new_h, new_w = float(short_side), scale * w
    else:
        new_h, new_w = scale * h, float(short_side)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


@dataclass
class ImageBatch:
    """A padded batch of normalised images.

    tensor:        ``[B, 3, H, W]`` float, ``(x - mean) / std`` in RGB order, zero (after normalisation)
                   at the bottom/right padding.
    padding_mask:  ``[B, H, W]`` bool, True on padding.
    image_sizes:   ``[B, 2]`` long, the ``(h, w)`` of each image before padding.
    """

    tensor: Tensor
    padding_mask: Tensor
    image_sizes: Tensor

    def to(self, device: torch.device | str) -> "ImageBatch":
        return ImageBatch(self.tensor.to(device), self.padding_mask.to(device), self.image_sizes.to(device))

    def __len__(self) -> int:
        return self.tensor.shape[0]


def batch_images(
    images: Sequence[Tensor],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size_divisibility: int = 0,
) -> ImageBatch:
    """Normalise ``[3, h, w]`` images (uint8 or float in 0..255, RGB) and pad them into one batch.

    Padding happens after normalisation, so padded pixels are 0 as in detectron2's ``ImageList``.
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    for i, img in enumerate(images):
        if img.ndim != 3 or img.shape[0] != 3:
            raise ValueError(f"image {i} must have shape [3, H, W], got {tuple(img.shape)}")
    device = images[0].device
    mean = torch.as_tensor(pixel_mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.as_tensor(pixel_std, dtype=torch.float32, device=device).view(3, 1, 1)
    max_h = max(int(img.shape[1]) for img in images)
    max_w = max(int(img.shape[2]) for img in images)
    if size_divisibility > 1:
        max_h = -(-max_h // size_divisibility) * size_divisibility
        max_w = -(-max_w // size_divisibility) * size_divisibility
    out = torch.zeros(len(images), 3, max_h, max_w, dtype=torch.float32, device=device)
    mask = torch.ones(len(images), max_h, max_w, dtype=torch.bool, device=device)
    sizes = torch.zeros(len(images), 2, dtype=torch.long, device=device)
    for i, img in enumerate(images):
        h, w = int(img.shape[1]), int(img.shape[2])
        out[i, :, :h, :w] = (img.to(torch.float32) - mean) / std
        mask[i, :h, :w] = False
        sizes[i, 0], sizes[i, 1] = h, w
    return ImageBatch(out, mask, sizes)
