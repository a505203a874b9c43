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
    batch, num_queries, num_classes = logits.shape
    prob = logits.sigmoid()
    if query_padding_mask is not None:
        prob = prob.masked_fill(query_padding_mask[..., None], -1.0)
    k = min(num_detections, num_queries * num_classes)
    scores, flat = policy.detections(prob.view(batch, -1), k)
    query = torch.div(flat, num_classes, rounding_mode="floor")
    labels = flat % num_classes
    picked = torch.gather(boxes, 1, query[..., None].expand(-1, -1, 4))
    xyxy = box_cxcywh_to_xyxy(picked)
    if original_sizes is None:
        original_sizes = input_sizes
    results = []
    for b in range(batch):
        in_h, in_w = [float(v) for v in input_sizes[b].tolist()]
        out_h, out_w = [float(v) for v in original_sizes[b].tolist()]
        # Scale to the network input in pixels, then to the original image (two steps, as detectron2).
        bx = xyxy[b] * torch.tensor([in_w, in_h, in_w, in_h], dtype=xyxy.dtype, device=xyxy.device)
        bx = bx * torch.tensor([out_w / in_w, out_h / in_h, out_w / in_w, out_h / in_h], dtype=xyxy.dtype,
                               device=xyxy.device)
        bx = torch.stack([bx[:, 0].clamp(0, out_w), bx[:, 1].clamp(0, out_h),
                          bx[:, 2].clamp(0, out_w), bx[:, 3].clamp(0, out_h)], dim=1)
        keep = ((bx[:, 2] - bx[:, 0]) > 0) & ((bx[:, 3] - bx[:, 1]) > 0) & (scores[b] >= max(score_threshold, 0.0))
        lab = labels[b][keep]
        names = [class_names[i] if class_names is not None else str(i) for i in lab.tolist()]
        results.append(Detections(bx[keep], scores[b][keep], lab, names, query[b][keep]))
    return results
