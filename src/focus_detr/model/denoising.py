"""Contrastive denoising queries (DINO), as the official ``prepare_for_cdn``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..ops.boxes import inverse_sigmoid


@dataclass
class DenoisingQueries:
    """Noised ground truth fed to the decoder in front of the matching queries.

    content:        ``[B, P, C]`` label embeddings (zero in unused slots).
    boxes:          ``[B, P, 4]`` box logits (inverse sigmoid of the noised cxcywh; zero in unused slots).
    attn_mask:      ``[P + Q, P + Q]`` bool, True = may not attend: matching queries cannot see any denoising
                    slot and denoising groups cannot see each other.
    num_groups, max_gt: ``P = 2 * max_gt * num_groups``; group g occupies ``[2 g max_gt, 2 (g + 1) max_gt)``,
                    positives first, then negatives.
    """

    content: Tensor
    boxes: Tensor
    attn_mask: Tensor
    num_groups: int
    max_gt: int


def build_attention_mask(num_groups: int, group_size: int, num_queries: int, device: torch.device) -> Tensor:
    """``[P + Q, P + Q]`` bool mask with ``P = num_groups * group_size``."""
    pad = num_groups * group_size
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    for g in range(num_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        mask[rows, :g * group_size] = True
        mask[rows, (g + 1) * group_size:pad] = True
    return mask


def prepare_denoising(
    targets: list[dict[str, Tensor]],
    num_dn_queries: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    num_classes: int,
    label_embed: nn.Embedding,
    num_queries: int,
) -> DenoisingQueries | None:
    """Noised copies of the ground truth, in ``2 * G`` copies (G groups of a positive and a negative copy).

    Args:
        targets: per image ``labels [n]`` and ``boxes [n, 4]`` (cxcywh normalised).
        num_dn_queries: budget of positive denoising queries (100 officially); ``G = max(1, 2 * num_dn_queries //
            (2 * max_gt))`` groups.
    Returns None when denoising is off or no image has ground truth.
    """
    if num_dn_queries <= 0:
        return None
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts) if counts else 0
    if max_gt == 0:
        return None
    device = label_embed.weight.device
    num_groups = max(1, (2 * num_dn_queries) // (2 * max_gt))
    num_copies = 2 * num_groups
    labels = torch.cat([t["labels"] for t in targets]).to(device)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device)
    batch_idx = torch.cat([torch.full_like(t["labels"], i) for i, t in enumerate(targets)]).to(device)
    total = labels.numel()

    noisy_labels = labels.repeat(num_copies)
    if label_noise_ratio > 0:
        flip = torch.rand(noisy_labels.shape, device=device) < label_noise_ratio * 0.5
        random_labels = torch.randint(0, num_classes, noisy_labels.shape, device=device)
        noisy_labels = torch.where(flip, random_labels, noisy_labels)

    known_boxes = boxes.repeat(num_copies, 1)
    noisy_boxes = known_boxes.clone()
    if box_noise_scale > 0:
        xyxy = torch.cat([known_boxes[:, :2] - known_boxes[:, 2:] / 2, known_boxes[:, :2] + known_boxes[:, 2:] / 2], 1)
        half_wh = torch.cat([known_boxes[:, 2:] / 2, known_boxes[:, 2:] / 2], 1)
        sign = torch.randint(0, 2, known_boxes.shape, device=device).to(known_boxes.dtype) * 2.0 - 1.0
        magnitude = torch.rand(known_boxes.shape, device=device)
        # Copy 2g + 1 of every group is the negative: its noise is in [1, 2) half-sizes, so it no longer
        # overlaps its object well and must be classified as background.
        negative = (torch.arange(num_copies, device=device) % 2 == 1).repeat_interleave(total)
        magnitude = magnitude + negative[:, None].to(magnitude.dtype)
        xyxy = (xyxy + magnitude * sign * half_wh * box_noise_scale).clamp(0.0, 1.0)
        noisy_boxes = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)

    pad = max_gt * num_copies
    batch = len(targets)
    content = torch.zeros(batch, pad, label_embed.embedding_dim, device=device)
    box_logits = torch.zeros(batch, pad, 4, device=device)
    within_image = torch.cat([torch.arange(n, device=device) for n in counts])
    slots = torch.cat([within_image + max_gt * c for c in range(num_copies)])
    batch_of_copy = batch_idx.repeat(num_copies)
    content[batch_of_copy, slots] = label_embed(noisy_labels)
    box_logits[batch_of_copy, slots] = inverse_sigmoid(noisy_boxes)
    attn_mask = build_attention_mask(num_groups, 2 * max_gt, num_queries, device)
    return DenoisingQueries(content, box_logits, attn_mask, num_groups, max_gt)
