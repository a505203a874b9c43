"""Foreground / background labels of every encoder token, for the foreground selector loss.

Re-implements the official ``GenTargets`` (``foreground_supervision.py``), an FCOS-style assignment
without centre sampling:

* token ``(i, j)`` of level ``l`` (stride ``s``) sits at pixel ``(j*s + s//2, i*s + s//2)`` of the padded
  canvas (an integer grid over the level's padded feature size, not the valid region);
* GT boxes are the normalised ``cxcywh`` targets scaled by the image's **own** un-padded ``(w, h)`` and
  converted to ``xyxy`` pixels (scale first, then convert, as the official code);
* with ``l, t, r, b`` the distances from the token to the four box sides, the token is positive for that
  box iff ``min(l, t, r, b) > 0`` (strictly inside) and ``lo < max(l, t, r, b) <= hi`` for the level's
  scale range; it is foreground iff positive for at least one box.

The official code also picks the smallest-area box per token and computes a centre-sampling mask, but
its labels are all 1 and the centre mask is unused, so only "positive for any box" matters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from focus_detr.ops.boxes import box_cxcywh_to_xyxy

DEFAULT_STRIDES: tuple[int, ...] = (8, 16, 32, 64)
DEFAULT_SCALE_RANGES: tuple[tuple[float, float], ...] = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, math.inf))


def foreground_targets(
    spatial_shapes: Tensor,
    image_sizes: Tensor,
    targets: Sequence[Mapping[str, Tensor]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    scale_ranges: Sequence[tuple[float, float]] = DEFAULT_SCALE_RANGES,
) -> Tensor:
    """Binary foreground label of every flattened token.

    Args:
        spatial_shapes: ``[L, 2]`` ``(H_l, W_l)`` of each (padded) feature level, finest first.
        image_sizes:    ``[B, 2]`` ``(h, w)`` un-padded network-input size of each image.
        targets:        ``B`` dicts with ``boxes`` ``[n_b, 4]`` normalised ``cxcywh`` (``labels`` unused:
                        the assignment is class-agnostic). ``n_b`` may be 0.
        strides:        ``L`` pixel strides of the levels.
        scale_ranges:   ``L`` half-open ``(lo, hi]`` ranges for ``max(l, t, r, b)``.

    Returns:
        ``[B, N]`` float32 with ``N = sum_l H_l W_l`` in level-major, row-major token order:
        1.0 on foreground tokens, 0.0 elsewhere (all zeros for an image without GT).
    """
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if not (len(shapes) == len(strides) == len(scale_ranges)):
        raise ValueError(f"{len(shapes)} levels, {len(strides)} strides, {len(scale_ranges)} scale ranges")
    batch_size = len(targets)
    if image_sizes.shape[0] != batch_size:
        raise ValueError(f"{image_sizes.shape[0]} image sizes for {batch_size} targets")
    device = image_sizes.device
    dtype = torch.float32  # the official grid and boxes are float32; the fixture is matched bit-exactly

    # Token centres (pixels) and per-token scale limits, all levels concatenated: [N].
    xs, ys, los, his = [], [], [], []
    for (height, width), stride, (lo, hi) in zip(shapes, strides, scale_ranges):
        col = torch.arange(width, device=device, dtype=dtype) * stride + stride // 2
        row = torch.arange(height, device=device, dtype=dtype) * stride + stride // 2
        grid_y, grid_x = torch.meshgrid(row, col, indexing="ij")
        xs.append(grid_x.reshape(-1))
        ys.append(grid_y.reshape(-1))
        los.append(torch.full((height * width,), float(lo), device=device, dtype=dtype))
        his.append(torch.full((height * width,), float(hi), device=device, dtype=dtype))
    x, y, lo_t, hi_t = (torch.cat(v) for v in (xs, ys, los, his))
    num_tokens = x.shape[0]

    # GT in xyxy pixels, padded to the batch maximum; padded rows are masked out by `valid`.
    max_gt = max((int(t["boxes"].shape[0]) for t in targets), default=0)
    if max_gt == 0:
        return torch.zeros(batch_size, num_tokens, device=device, dtype=dtype)
    gt = torch.zeros(batch_size, max_gt, 4, device=device, dtype=dtype)
    valid = torch.zeros(batch_size, max_gt, device=device, dtype=torch.bool)
    for b, t in enumerate(targets):
        n = int(t["boxes"].shape[0])
        if n == 0:
            continue
        h, w = (float(v) for v in image_sizes[b].tolist())
        scale = torch.tensor([w, h, w, h], device=device, dtype=dtype)
        gt[b, :n] = box_cxcywh_to_xyxy(t["boxes"].to(device=device, dtype=dtype) * scale)
        valid[b, :n] = True

    # Distances to the four sides, [B, N, M] each; min / max without stacking a [B, N, M, 4] tensor.
    left = x[None, :, None] - gt[:, None, :, 0]
    top = y[None, :, None] - gt[:, None, :, 1]
    right = gt[:, None, :, 2] - x[None, :, None]
    bottom = gt[:, None, :, 3] - y[None, :, None]
    off_min = torch.minimum(torch.minimum(left, top), torch.minimum(right, bottom))
    off_max = torch.maximum(torch.maximum(left, top), torch.maximum(right, bottom))
    positive = (
        (off_min > 0)
        & (off_max > lo_t[None, :, None])
        & (off_max <= hi_t[None, :, None])
        & valid[:, None, :]
    )
    return positive.any(dim=-1).to(dtype)
