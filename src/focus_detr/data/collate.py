"""Collating ``(image, target)`` items into a model-ready batch."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from focus_detr.ops.boxes import box_xyxy_to_cxcywh
from focus_detr.ops.images import ImageBatch, batch_images


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Any]]],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    size_divisibility: int = 0,
) -> tuple[ImageBatch, list[dict[str, Any]]]:
    """Normalise and pad the images; make the targets model-ready.

    Args:
        batch: items of :class:`~focus_detr.data.coco.CocoDetection`: a uint8 ``[3, h, w]`` RGB image and a
            target with ``boxes`` (float ``[n, 4]`` xyxy pixels in that image), ``labels`` (``[n]``),
            ``image_id``, ``orig_size`` and ``size`` (long ``(h, w)``).
        pixel_mean / pixel_std: RGB, 0..255 scale (the model config's values).
        size_divisibility: pad H and W up to a multiple of this (0: the batch maximum, as the official model).

    Returns:
        ``(ImageBatch, targets)``; ``ImageBatch`` as :func:`focus_detr.ops.images.batch_images` (padding
        zero after normalisation, ``padding_mask`` True on padding). One target per image:
            ``labels``: int64 ``[n]``;
            ``boxes``: float32 ``[n, 4]`` ``(cx, cy, w, h)`` normalised by that image's own un-padded
            ``size`` -- not by the padded batch size -- as the official ``prepare_targets``;
            ``boxes_xyxy``: float32 ``[n, 4]`` absolute pixels (the input ``boxes``);
            ``image_id`` (int), ``orig_size`` and ``size`` (long ``[2]``, ``(h, w)``).
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch")
    images = [item[0] for item in batch]
    image_batch = batch_images(images, pixel_mean, pixel_std, size_divisibility)
    targets = []
    for i, (image, target) in enumerate(batch):
        h, w = int(image.shape[1]), int(image.shape[2])
        size = target.get("size")
        if size is not None and (int(size[0]), int(size[1])) != (h, w):
            raise ValueError(f"batch item {i}: target size {tuple(int(s) for s in size)} does not match "
                             f"the image size {(h, w)}")
        boxes_xyxy = torch.as_tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        targets.append({
            "labels": torch.as_tensor(target["labels"], dtype=torch.int64).reshape(-1),
            "boxes": box_xyxy_to_cxcywh(boxes_xyxy) / scale,
            "boxes_xyxy": boxes_xyxy,
            "image_id": target.get("image_id"),
            "orig_size": torch.as_tensor(target.get("orig_size", (h, w)), dtype=torch.long),
            "size": torch.tensor([h, w], dtype=torch.long),
        })
    return image_batch, targets


def make_collate(
    pixel_mean: Sequence[float], pixel_std: Sequence[float], size_divisibility: int = 0,
) -> Callable[[Sequence[tuple[Tensor, dict[str, Any]]]], tuple[ImageBatch, list[dict[str, Any]]]]:
    """A picklable ``collate_fn`` for ``DataLoader`` (works with worker processes under spawn)."""
    return functools.partial(collate_detection, pixel_mean=tuple(float(m) for m in pixel_mean),
                             pixel_std=tuple(float(s) for s in pixel_std), size_divisibility=size_divisibility)
