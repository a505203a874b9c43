"""Batching images the way the official model does: normalise, then zero-pad bottom/right."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


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
