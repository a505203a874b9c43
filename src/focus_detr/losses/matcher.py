"""Hungarian matching between predictions and ground truth (DETR / detrex ``HungarianMatcher``).

One cost matrix is built for the whole batch (every query against every GT of the batch) and split
per image, as DETR does; the assignment itself is scipy's ``linear_sum_assignment``. The class cost is
the detrex focal cost, written with the same operations (and the same ``1e-8`` inside the logs) so
that near-equal costs break the same way as in the official code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from focus_detr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

MatchIndices = list[tuple[Tensor, Tensor]]


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of queries to ground-truth boxes.

    Cost of assigning query ``q`` to GT ``j`` (class ``c_j``, box ``b_j``)::

        C = cost_bbox * |box_q - b_j|_1  +  cost_class * C_cls(p_{q,c_j})  -  cost_giou * GIoU(box_q, b_j)
        C_cls(p) = alpha (1 - p)^gamma (-log(p + 1e-8)) - (1 - alpha) p^gamma (-log(1 - p + 1e-8))

    with ``p = sigmoid(logit)``, boxes in normalised ``cxcywh`` (L1) and ``xyxy`` (GIoU).

    Args:
        cost_class: weight of the focal class cost.
        cost_bbox:  weight of the L1 box cost.
        cost_giou:  weight of the negative-GIoU cost.
        alpha:      focal cost alpha.
        gamma:      focal cost gamma.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.alpha = alpha
        self.gamma = gamma

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, cost_giou={self.cost_giou}, "
            f"alpha={self.alpha}, gamma={self.gamma}"
        )

    @torch.no_grad()
    def forward(
        self,
        logits: Tensor,
        boxes: Tensor,
        targets: Sequence[Mapping[str, Tensor]],
        query_padding_mask: Tensor | None = None,
    ) -> MatchIndices:
        """Match one set of predictions.

        Args:
            logits:  ``[B, Q, C]`` raw class logits.
            boxes:   ``[B, Q, 4]`` predicted normalised ``cxcywh`` boxes.
            targets: ``B`` dicts with ``labels`` int64 ``[n_b]`` and ``boxes`` ``[n_b, 4]`` normalised ``cxcywh``.
            query_padding_mask: optional ``[B, Q]`` bool, True on queries that carry no prediction
                     (``FocusDETROutputs.query_padding_mask``); they are left out of the assignment.
                     None (the official behaviour) uses every query.

        Returns:
            ``B`` tuples ``(query_idx, gt_idx)`` of int64 CPU tensors of length ``min(#queries, n_b)``, sorted
            by query index (scipy's order); empty tensors for an image without GT.
        """
        batch_size, num_queries = logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"{len(targets)} targets for a batch of {batch_size}")
        sizes = [int(t["boxes"].shape[0]) for t in targets]
        if sum(sizes) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return [(empty.clone(), empty.clone()) for _ in sizes]

        # Costs in at least float32 (a no-op for float32 inputs; keeps half-precision outputs matchable).
        work_dtype = torch.promote_types(logits.dtype, torch.float32)
        out_prob = logits.flatten(0, 1).to(work_dtype).sigmoid()  # [B*Q, C]
        out_bbox = boxes.flatten(0, 1).to(work_dtype)  # [B*Q, 4]
        tgt_ids = torch.cat([t["labels"] for t in targets]).to(device=logits.device, dtype=torch.int64)  # [T]
        tgt_bbox = torch.cat([t["boxes"] for t in targets]).to(device=logits.device, dtype=work_dtype)  # [T, 4]

        alpha, gamma = self.alpha, self.gamma
        neg_cost = (1 - alpha) * (out_prob**gamma) * (-(1 - out_prob + 1e-8).log())
        pos_cost = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
        cost_class = pos_cost[:, tgt_ids] - neg_cost[:, tgt_ids]  # [B*Q, T]
        cost_bbox = torch.cdist(out_bbox, tgt_bbox, p=1)  # [B*Q, T]
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(out_bbox), box_cxcywh_to_xyxy(tgt_bbox))  # [B*Q, T]

        cost = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        cost = cost.view(batch_size, num_queries, -1).cpu()

        valid_queries = None if query_padding_mask is None else (~query_padding_mask.bool()).cpu()
        indices: MatchIndices = []
        # Column block b of the batch cost holds image b's GT; only the (image b, block b) part is used.
        for b, block in enumerate(cost.split(sizes, dim=-1)):
            image_cost = block[b]
            if valid_queries is None:
                rows, cols = linear_sum_assignment(image_cost.numpy())
                query_idx = torch.as_tensor(rows, dtype=torch.int64)
            else:
                # Assign among the real queries only, then map back to query ids (stays sorted).
                real = valid_queries[b].nonzero().squeeze(1)
                rows, cols = linear_sum_assignment(image_cost[real].numpy())
                query_idx = real[torch.as_tensor(rows, dtype=torch.int64)]
            indices.append((query_idx, torch.as_tensor(cols, dtype=torch.int64)))
        return indices
