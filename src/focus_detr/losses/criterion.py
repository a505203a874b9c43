"""Training losses of Focus-DETR: set prediction (Hungarian), denoising and foreground supervision.

Reproduces the official criterion stack (detrex ``SetCriterion`` -> Focus-DETR ``TwoStageCriterion``
-> ``FOCUS_DETRCriterion``) on the :class:`~focus_detr.model.outputs.FocusDETROutputs` contract.

Returned keys (all **unweighted**; :meth:`SetCriterion.weighted` / :meth:`SetCriterion.total` apply the
weights, as the official model forward does):

=====================================  =================================================================
``loss_class``, ``loss_bbox``,          final decoder layer, Hungarian-matched
``loss_giou``
``select_loss``                         foreground token selector (only when ``foreground_logits`` is set)
``loss_{class,bbox,giou}_{i}``          decoder layer ``i`` of ``outputs.aux`` (``i = 0 .. L-2``), own matching
``loss_{class,bbox,giou}_enc``          two-stage encoder proposals, own matching, real class labels
``loss_{class,bbox,giou}_dn``           denoising queries of the final layer, fixed assignment
``loss_{class,bbox,giou}_dn_{i}``       denoising queries of decoder layer ``i``; all dn keys are zero
                                        tensors when ``outputs.denoising is None`` (as the official code)
=====================================  =================================================================

Normalisation: ``num_boxes`` = number of GT boxes in the batch, summed over processes and divided by the
world size when ``torch.distributed`` is initialised, clamped to >= 1, computed once per forward.

* ``loss_class`` = sum over all queries x classes of the sigmoid focal loss with one-hot targets (matched
  queries get their GT class, the others none) / ``num_boxes``. (detrex writes it as
  ``focal.mean(1).sum() / num_boxes * Q``, which is the same sum.)
* ``loss_bbox`` = sum of L1 over matched normalised ``cxcywh`` boxes / ``num_boxes``;
  ``loss_giou`` = sum of ``1 - GIoU`` over matched pairs / ``num_boxes``.
* Denoising: image ``b`` with ``n_b`` GT, group ``g``: DN output slot ``g * 2 * max_gt + j`` <-> GT ``j``
  (``j < n_b``), all groups; the class loss runs over all ``P`` slots (negatives and unused slots are
  background), box losses over the positives only; normaliser ``num_boxes * num_groups``.
* ``select_loss`` = mean over images of (sum over all tokens, padding included, of the foreground focal
  loss) / max(1, number of foreground tokens of that image); targets from :func:`foreground_targets`.
* ``outputs.query_padding_mask`` (batch-invariant mode only; None in the official mode): queries marked
  True hold no prediction, so they are excluded from the matching and from ``loss_class`` of the main, aux
  and ``_enc`` sets (query ``i`` is built from proposal ``i``, so one mask serves all three).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from focus_detr.losses.focal import foreground_focal_loss, sigmoid_focal_loss
from focus_detr.losses.foreground_targets import DEFAULT_SCALE_RANGES, DEFAULT_STRIDES, foreground_targets
from focus_detr.losses.matcher import HungarianMatcher, MatchIndices
from focus_detr.model.outputs import FocusDETROutputs, Predictions
from focus_detr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

SET_LOSS_NAMES: tuple[str, ...] = ("loss_class", "loss_bbox", "loss_giou")
SELECT_LOSS_NAME = "select_loss"
# The official foreground loss uses focal_loss_from_logits' own defaults, independent of the class loss.
FOREGROUND_FOCAL_ALPHA = 0.25
FOREGROUND_FOCAL_GAMMA = 2.0

# "loss_class_3" -> "loss_class", "loss_bbox_dn_0" -> "loss_bbox_dn", "loss_giou_enc" -> "loss_giou".
_BASE_KEY = re.compile(r"^(loss_(?:class|bbox|giou)(?:_dn)?)(?:_enc|_\d+)?$")


def default_weight_dict(
    num_decoder_layers: int = 6,
    class_weight: float = 1.0,
    bbox_weight: float = 5.0,
    giou_weight: float = 2.0,
    foreground_weight: float = 1.5,
) -> dict[str, float]:
    """The official weight dict: ``{class 1, bbox 5, giou 2}`` for the main, ``_enc``, ``_0.._{L-2}``,
    ``_dn`` and ``_dn_{i}`` keys, plus ``select_loss`` 1.5 (40 keys for 6 decoder layers)."""
    base = {"loss_class": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
    suffixes = ["", "_enc"] + [f"_{i}" for i in range(num_decoder_layers - 1)]
    suffixes += ["_dn"] + [f"_dn_{i}" for i in range(num_decoder_layers - 1)]
    weights = {name + suffix: w for suffix in suffixes for name, w in base.items()}
    weights[SELECT_LOSS_NAME] = foreground_weight
    return weights


class SetCriterion(nn.Module):
    """All Focus-DETR training losses for one batch (see the module docstring for keys and formulas).

    Args:
        num_classes:             number of foreground classes ``C`` (no background class).
        matcher:                 Hungarian matcher used for the main, aux and encoder outputs.
        weight_dict:             loss name -> weight; default :func:`default_weight_dict`. A key missing
                                 here falls back to its base name (``loss_class_3`` -> ``loss_class``).
        focal_alpha:             alpha of the class focal loss.
        focal_gamma:             gamma of the class focal loss.
        foreground_loss_weight:  weight of ``select_loss``; always written into ``weight_dict`` (the
                                 official criterion injects 1.5 the same way).
        num_decoder_layers:      only used to build the default weight dict.
        foreground_strides:      pixel stride of each feature level for the foreground targets.
        foreground_scale_ranges: ``(lo, hi]`` of ``max(l, t, r, b)`` per level for the foreground targets.

    After each forward, ``last_indices`` maps ``"main"``, ``"aux_{i}"``, ``"enc"`` and (with denoising)
    ``"dn"`` to the per-image ``(query_idx, gt_idx)`` pairs used, and ``last_num_boxes`` holds the
    normaliser.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        foreground_loss_weight: float = 1.5,
        num_decoder_layers: int = 6,
        foreground_strides: Sequence[int] = DEFAULT_STRIDES,
        foreground_scale_ranges: Sequence[tuple[float, float]] = DEFAULT_SCALE_RANGES,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        weights = dict(default_weight_dict(num_decoder_layers) if weight_dict is None else weight_dict)
        weights[SELECT_LOSS_NAME] = foreground_loss_weight
        self.weight_dict: dict[str, float] = weights
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.foreground_strides = tuple(foreground_strides)
        self.foreground_scale_ranges = tuple(foreground_scale_ranges)
        self.last_indices: dict[str, MatchIndices] = {}
        self.last_num_boxes: float = 0.0

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: FocusDETROutputs, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Compute every loss of one batch.

        Args:
            outputs: the detector's outputs (training mode). Uses ``main``, ``aux``, ``encoder_proposals``,
                     ``denoising``, ``foreground_logits``, ``spatial_shapes``, ``image_sizes`` and
                     ``query_padding_mask`` (queries marked True are neither matched nor put in the class
                     loss, for the main, aux and encoder-proposal sets; None, the official case, changes
                     nothing).
            targets: ``B`` dicts with ``labels`` int64 ``[n_b]`` in ``0..C-1`` and ``boxes`` ``[n_b, 4]``
                     ``cxcywh`` normalised by the image's un-padded size.

        Returns:
            Unweighted losses, scalar tensors, keyed as in the module docstring.
        """
        device = outputs.main.logits.device
        box_dtype = outputs.main.boxes.dtype
        targets = [
            {
                "labels": t["labels"].to(device=device, dtype=torch.int64),
                "boxes": t["boxes"].to(device=device, dtype=box_dtype),
            }
            for t in targets
        ]
        if len(targets) != outputs.main.logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs.main.logits.shape[0]}")
        num_boxes = self._num_boxes(targets, device)
        self.last_num_boxes = num_boxes
        indices: dict[str, MatchIndices] = {}
        losses: dict[str, Tensor] = {}

        # Key order follows the official loss dict: main, select, aux, enc, dn.
        # Batch-invariant mode marks queries that hold no prediction (same [B, Q] mask for the decoder
        # queries and the proposals they come from): they are neither matched nor scored. None = official.
        query_mask = outputs.query_padding_mask
        indices["main"] = self.matcher(outputs.main.logits, outputs.main.boxes, targets, query_mask)
        losses.update(self._set_losses(outputs.main, targets, indices["main"], num_boxes, "", query_mask))

        if outputs.foreground_logits is not None:
            losses[SELECT_LOSS_NAME] = self._select_loss(outputs, targets)

        for i, aux in enumerate(outputs.aux):
            key = f"aux_{i}"
            indices[key] = self.matcher(aux.logits, aux.boxes, targets, query_mask)
            losses.update(self._set_losses(aux, targets, indices[key], num_boxes, f"_{i}", query_mask))

        enc = outputs.encoder_proposals
        indices["enc"] = self.matcher(enc.logits, enc.boxes, targets, query_mask)
        losses.update(self._set_losses(enc, targets, indices["enc"], num_boxes, "_enc", query_mask))

        losses.update(self._denoising_losses(outputs, targets, num_boxes, indices))
        self.last_indices = indices
        return losses

    # ------------------------------------------------------------------ weighting
    def weight_of(self, key: str) -> float:
        """Weight of one loss key: exact entry of ``weight_dict``, else that of its base name."""
        if key in self.weight_dict:
            return self.weight_dict[key]
        match = _BASE_KEY.match(key)
        if match is not None and match.group(1) in self.weight_dict:
            return self.weight_dict[match.group(1)]
        raise KeyError(f"no weight for loss {key!r}")

    def weighted(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each loss multiplied by its weight (the dict the official model forward returns)."""
        return {k: v * self.weight_of(k) for k, v in losses.items()}

    def total(self, losses: Mapping[str, Tensor]) -> Tensor:
        """Sum of the weighted losses: the scalar to back-propagate."""
        weighted = list(self.weighted(losses).values())
        if not weighted:
            raise ValueError("no losses to sum")
        return torch.stack([v.to(weighted[0].dtype) for v in weighted]).sum()

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _num_boxes(targets: Sequence[Mapping[str, Tensor]], device: torch.device) -> float:
        """Average GT count per process, clamped to >= 1 (one host sync per forward, as the official)."""
        count = torch.as_tensor([float(sum(int(t["labels"].shape[0]) for t in targets))], device=device)
        world_size = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            world_size = dist.get_world_size()
        return float(torch.clamp(count / world_size, min=1).item())

    @staticmethod
    def _src_permutation(indices: MatchIndices, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(batch_idx, query_idx)`` of all matched predictions, concatenated over images."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        return batch_idx, src_idx

    def _set_losses(
        self,
        pred: Predictions,
        targets: Sequence[Mapping[str, Tensor]],
        indices: MatchIndices,
        normaliser: float,
        suffix: str,
        query_padding_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """``loss_class``, ``loss_bbox``, ``loss_giou`` (+ ``suffix``) of one prediction set.

        Args:
            pred:       logits ``[B, Q, C]`` and boxes ``[B, Q, 4]``.
            targets:    per-image ``labels`` / ``boxes`` (already on the prediction device).
            indices:    per-image ``(query_idx, gt_idx)``.
            normaliser: ``num_boxes`` (times the number of groups for denoising).
            suffix:     appended to every key.
            query_padding_mask: optional ``[B, Q]`` bool; True queries are left out of the class loss.
        """
        logits, boxes = pred.logits, pred.boxes
        device = logits.device
        batch_idx, src_idx = self._src_permutation(indices, device)
        gt_idx = [tgt.to(device) for _, tgt in indices]
        matched_labels = torch.cat([t["labels"][j] for t, j in zip(targets, gt_idx)])
        matched_gt_boxes = torch.cat([t["boxes"][j] for t, j in zip(targets, gt_idx)])

        # One-hot over the C real classes; unmatched queries have no positive class (background).
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, src_idx, matched_labels] = 1
        focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma)  # [B, Q, C]
        if query_padding_mask is not None:
            focal = focal.masked_fill(query_padding_mask.to(device=device, dtype=torch.bool)[..., None], 0.0)
        loss_class = focal.sum() / normaliser

        matched_boxes = boxes[batch_idx, src_idx]  # [K, 4]
        loss_bbox = F.l1_loss(matched_boxes, matched_gt_boxes, reduction="none").sum() / normaliser
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(matched_gt_boxes)))
        loss_giou = (1 - giou).sum() / normaliser
        return {"loss_class" + suffix: loss_class, "loss_bbox" + suffix: loss_bbox, "loss_giou" + suffix: loss_giou}

    def _select_loss(self, outputs: FocusDETROutputs, targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
        """Foreground selector loss: per image, focal sum over all tokens / max(1, #fg tokens); batch mean."""
        fg_logits = outputs.foreground_logits
        assert fg_logits is not None
        if fg_logits.dim() == 3:  # tolerate the official [B, N, 1] layout
            fg_logits = fg_logits.squeeze(-1)
        fg_targets = foreground_targets(
            outputs.spatial_shapes,
            outputs.image_sizes.to(fg_logits.device),
            targets,
            strides=self.foreground_strides,
            scale_ranges=self.foreground_scale_ranges,
        )
        if fg_targets.shape != fg_logits.shape:
            raise ValueError(f"foreground logits {tuple(fg_logits.shape)} vs token grid {tuple(fg_targets.shape)}")
        per_token = foreground_focal_loss(fg_logits, fg_targets, FOREGROUND_FOCAL_ALPHA, FOREGROUND_FOCAL_GAMMA)
        num_pos = fg_targets.sum(dim=1).clamp(min=1)
        return (per_token.sum(dim=1) / num_pos.to(per_token.dtype)).mean()

    @staticmethod
    def denoising_indices(
        targets: Sequence[Mapping[str, Tensor]], num_groups: int, max_gt: int
    ) -> MatchIndices:
        """Fixed denoising assignment: slot ``g * 2 * max_gt + j`` <-> GT ``j`` for every group ``g``.

        Returns per image ``(slot_idx, gt_idx)`` int64 CPU tensors of length ``num_groups * n_b``, group-major
        (the official order); empty for an image without GT.
        """
        indices: MatchIndices = []
        for t in targets:
            n = int(t["labels"].shape[0])
            gt = torch.arange(n, dtype=torch.int64).repeat(num_groups)  # [G*n]: 0..n-1, 0..n-1, ...
            group_offset = (torch.arange(num_groups, dtype=torch.int64) * 2 * max_gt).repeat_interleave(n)
            indices.append((group_offset + gt, gt))
        return indices

    def _denoising_losses(
        self,
        outputs: FocusDETROutputs,
        targets: Sequence[Mapping[str, Tensor]],
        num_boxes: float,
        indices: dict[str, MatchIndices],
    ) -> dict[str, Tensor]:
        """``_dn`` (final layer) and ``_dn_{i}`` (layer i) losses; zeros when there is no denoising."""
        suffixes = ["_dn"] + [f"_dn_{i}" for i in range(len(outputs.aux))]
        dn = outputs.denoising
        if dn is None:
            zero = outputs.main.logits.new_zeros(())
            return {name + s: zero.clone() for s in suffixes for name in SET_LOSS_NAMES}

        num_layers = dn.logits.shape[0]
        if num_layers != len(outputs.aux) + 1:
            raise ValueError(f"denoising outputs have {num_layers} layers, expected {len(outputs.aux) + 1}")
        if dn.logits.shape[2] != 2 * dn.max_gt * dn.num_groups:
            raise ValueError(f"{dn.logits.shape[2]} denoising slots != 2 * {dn.max_gt} * {dn.num_groups}")
        dn_indices = self.denoising_indices(targets, dn.num_groups, dn.max_gt)
        indices["dn"] = dn_indices
        normaliser = num_boxes * dn.num_groups
        losses: dict[str, Tensor] = {}
        # Layer order: the final layer (index -1) gets "_dn", layer i < L-1 gets "_dn_{i}".
        layer_of_suffix = [num_layers - 1] + list(range(num_layers - 1))
        for layer, suffix in zip(layer_of_suffix, suffixes):
            pred = Predictions(logits=dn.logits[layer], boxes=dn.boxes[layer])
            losses.update(self._set_losses(pred, targets, dn_indices, normaliser, suffix=suffix))
        return losses
