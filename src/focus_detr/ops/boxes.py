"""Box conversions and overlaps. Boxes are ``[..., 4]`` tensors, either ``cxcywh`` or ``xyxy``."""

from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes ``[N, 4] -> [N]``."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of ``xyxy`` boxes ``[N, 4] x [M, 4] -> ([N, M] iou, [N, M] union)``."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    return inter / union, union


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU per batch element of ``xyxy`` boxes ``[B, N, 4] x [B, M, 4] -> [B, N, M]``
    (0 where both boxes are empty)."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    lt = torch.max(boxes1[:, :, None, :2], boxes2[:, None, :, :2])
    rb = torch.min(boxes1[:, :, None, 2:], boxes2[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, :, None] + area2[:, None, :] - inter
    return inter / union.clamp(min=1e-12)


def fast_nms_keep(boxes: Tensor, iou_threshold: float) -> Tensor:
    """Which boxes survive "Fast NMS" (YOLACT): ``xyxy [B, M, 4]`` sorted best first -> keep ``[B, M]`` bool.

    A box is dropped when any better box overlaps it by more than ``iou_threshold``, even a box that is
    dropped itself. That suppresses slightly more than greedy NMS but is one batched matrix operation
    instead of a Python loop over boxes, which matters inside a training step.
    """
    iou = batched_box_iou(boxes, boxes).triu(diagonal=1)  # [b, i, j]: box i better than box j
    return iou.amax(dim=1) <= iou_threshold


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """Pairwise generalised IoU of ``xyxy`` boxes ``[N, 4] x [M, 4] -> [N, M]``.

    ``eps`` in both denominators follows the official (patched detrex) ``box_ops``; it keeps degenerate
    boxes finite and changes results by ~1e-6 relative at most.
    """
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[:, None] + area2 - inter
    iou = inter / (union + eps)
    lt_c = torch.min(boxes1[:, None, :2], boxes2[:, :2])
    rb_c = torch.max(boxes1[:, None, 2:], boxes2[:, 2:])
    wh_c = (rb_c - lt_c).clamp(min=0)
    area_c = wh_c[..., 0] * wh_c[..., 1]
    return iou - (area_c - union) / (area_c + eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``log(x / (1 - x))`` with both terms clamped to ``eps`` (detrex convention)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
