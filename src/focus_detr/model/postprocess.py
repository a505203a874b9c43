"""Turn raw predictions into per-image detections in original-image pixels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..ops.boxes import box_cxcywh_to_xyxy
from .selection import DEFAULT_POLICY, SelectionPolicy


@dataclass
class Detections:
    """Detections of one image.

    boxes:  ``[K, 4]`` float xyxy in pixels of the original image.
    scores: ``[K]`` sigmoid class probabilities, descending.
    labels: ``[K]`` long contiguous class ids.
    names:  class names (``str(label)`` when the model has none).
    query_indices: ``[K]`` which decoder query produced each detection.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    query_indices: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_coco(self, image_id: int, label_to_category_id: dict[int, int] | None = None) -> list[dict]:
        """COCO results-format records (``bbox`` in xywh pixels)."""
        records = []
        for box, score, label in zip(self.boxes.tolist(), self.scores.tolist(), self.labels.tolist()):
            x0, y0, x1, y1 = box
            category = label_to_category_id[label] if label_to_category_id is not None else int(label)
            records.append({"image_id": int(image_id), "category_id": int(category),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
        return records

    def plot(self, image, score_threshold: float = 0.3, legend: bool = True):
        """``image`` (path, PIL image, array or tensor, as :meth:`FocusDETR.predict` takes) with these
        detections drawn, as a new RGB ``PIL.Image``; see :func:`focus_detr.draw_detections` (tags that do
        not fit go to a legend strip below the picture unless ``legend=False``)."""
        # Like FocusDETR.predict, plot decodes with data's leaf decoder (README "Layout"), imported on use.
        from ..data.image_io import to_rgb_array
        from ..viz.draw import draw_detections  # lazy: the model package never needs viz to load

        # Read as predict reads it (EXIF orientation applied), so the boxes land where predict saw them.
        return draw_detections(to_rgb_array(image), self, score_threshold=score_threshold, legend=legend)

    def to_supervision(self):  # pragma: no cover - optional dependency
        """Convert to ``supervision.Detections`` (needs the optional ``supervision`` package)."""
        try:
            import supervision as sv
        except ImportError as e:
            raise ImportError("to_supervision() needs the optional package 'supervision' (pip install supervision)") from e
        import numpy as np
        return sv.Detections(xyxy=self.boxes.cpu().numpy().astype(np.float32),
                             confidence=self.scores.cpu().numpy(),
                             class_id=self.labels.cpu().numpy().astype(int),
                             data={"class_name": np.array(self.names)})


def select_detections(
    logits: Tensor,
    boxes: Tensor,
    num_detections: int,
    query_padding_mask: Tensor | None = None,
    policy: SelectionPolicy = DEFAULT_POLICY,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-``K`` over queries x classes, ``K = min(num_detections, Q * C)`` (tensor ops only: traceable).

    Args:
        logits:             ``[B, Q, C]`` final-layer class logits.
        boxes:              ``[B, Q, 4]`` sigmoid cxcywh, normalised to each image's network-input size.
        query_padding_mask: ``[B, Q]`` True on queries that carry no prediction (ranked last, score -1).
    Returns:
        scores ``[B, K]`` (sigmoid, descending), labels ``[B, K]``, query indices ``[B, K]`` and boxes
        ``[B, K, 4]`` xyxy, normalised.
    """
    batch, num_queries, num_classes = logits.shape
    prob = logits.sigmoid()
    if query_padding_mask is not None:
        prob = prob.masked_fill(query_padding_mask[..., None], -1.0)
    k = torch.sym_min(num_detections, num_queries * num_classes)
    scores, flat = policy.detections(prob.view(batch, -1), k)
    query = torch.div(flat, num_classes, rounding_mode="floor")
    labels = flat % num_classes
    picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
    return scores, labels, query, box_cxcywh_to_xyxy(picked)


def boxes_to_pixels(boxes: Tensor, input_sizes: Tensor, original_sizes: Tensor | None = None) -> Tensor:
    """Normalised xyxy ``[B, K, 4]`` -> pixels of ``original_sizes [B, 2]`` ``(h, w)`` (default: of the
    network input, ``input_sizes [B, 2]``), clipped to the image.

    Two steps, as detectron2: to network-input pixels, then by the ``original / input`` ratio (computed in
    float64, then rounded to float32).
    """
    in_wh = input_sizes.flip(-1).to(boxes.dtype)
    pixels = boxes * torch.cat([in_wh, in_wh], -1)[:, None]
    if original_sizes is None:
        limit = in_wh
    else:
        out_wh = original_sizes.to(input_sizes.device).flip(-1)
        ratio = (out_wh.cpu().double() / input_sizes.flip(-1).cpu().double()).to(boxes.dtype).to(boxes.device)
        pixels = pixels * torch.cat([ratio, ratio], -1)[:, None]
        limit = out_wh.to(boxes.dtype)
    limit = torch.cat([limit, limit], -1)[:, None]
    return torch.minimum(torch.maximum(pixels, torch.zeros_like(limit)), limit)


def postprocess(
    logits: Tensor,
    boxes: Tensor,
    input_sizes: Tensor,
    original_sizes: Tensor | None = None,
    num_detections: int = 300,
    class_names: tuple[str, ...] | None = None,
    query_padding_mask: Tensor | None = None,
    score_threshold: float = 0.0,
    policy: SelectionPolicy = DEFAULT_POLICY,
) -> list[Detections]:
    """Top-k over queries x classes, boxes scaled to pixels, clipped, empty ones dropped.

    Args:
        logits:         ``[B, Q, C]`` final-layer class logits.
        boxes:          ``[B, Q, 4]`` sigmoid cxcywh, normalised to each image's network-input size.
        input_sizes:    ``[B, 2]`` ``(h, w)`` of each network input (after the test-time resize, before padding).
        original_sizes: ``[B, 2]`` ``(h, w)`` to rescale to (default: the input sizes).
        query_padding_mask: ``[B, Q]`` True on queries that carry no prediction.
    """
    scores, labels, query, xyxy = select_detections(logits, boxes, num_detections, query_padding_mask, policy)
    xyxy = boxes_to_pixels(xyxy, input_sizes, original_sizes)
    results = []
    for b in range(logits.shape[0]):
        bx = xyxy[b]
        keep = ((bx[:, 2] - bx[:, 0]) > 0) & ((bx[:, 3] - bx[:, 1]) > 0) & (scores[b] >= max(score_threshold, 0.0))
        lab = labels[b][keep]
        names = [class_names[i] if class_names is not None else str(i) for i in lab.tolist()]
        results.append(Detections(bx[keep], scores[b][keep], lab, names, query[b][keep]))
    return results
