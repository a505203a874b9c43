"""What a batch of images of different sizes means to the model, in one object per ``batch_mode``.

A batch pads its images to a common canvas. Where the detector must decide what that padding does (is it
image or not, may a padded token be chosen, how many tokens does each image keep, how are query positions
scaled), it asks a :class:`Batching`; nothing else in the model knows the batch mode. There are three:

* :data:`OFFICIAL` (``batch_mode="official"``): the official implementation's behaviour, where an image's
  result depends on its batch mates (eval counts padding as image, every image keeps the batch's largest
  token budget, query positions are scaled by the padded canvas).
* :data:`INVARIANT` (``batch_mode="invariant"``, images of different sizes): every image gets what it would
  get alone (backbone run per image, padding never selected, budgets per image, padded queries masked).
* :data:`UNPADDED` (``batch_mode="invariant"`` when every image fills the canvas, e.g. a batch of one): the
  same results as :data:`INVARIANT` without padding bookkeeping: no mask, no branch on a tensor value and
  no per-image loop, so this path is also what the ONNX export traces.

:meth:`FocusDETR.batching <focus_detr.model.FocusDETR.batching>` picks one from the config and
:meth:`Batching.for_batch` refines :data:`INVARIANT` to :data:`UNPADDED` for a batch without padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.images import ImageBatch
from .selection import DEFAULT_POLICY, STABLE_POLICY, SelectionPolicy

#: The neck: ``[B, 3, H, W]`` normalised images -> per level ``[B, C, H_l, W_l]``, fine to coarse.
NeckFn = Callable[[Tensor], list[Tensor]]


@dataclass
class LevelMaps:
    """Neck features of a batch and what of them is image.

    features: per level ``[B, C, H_l, W_l]``.
    masks:    per level ``[B, H_l, W_l]`` bool, True on padding.
    valid:    per level ``[B, H_l * W_l]`` bool, the tokens that count in the foreground selector's global
              mean, or None: the whole map counts, padding included (official).
    sizes:    ``[B, L, 2]`` each image's own ``(h, w)`` on each level, or None when upsampling whole maps is
              right (official, or every image fills the map).
    """

    features: list[Tensor]
    masks: list[Tensor]
    valid: list[Tensor] | None
    sizes: Tensor | None


def _masks_from_sizes(features: list[Tensor], sizes: Tensor) -> list[Tensor]:
    masks = []
    for level, f in enumerate(features):
        h, w = f.shape[-2:]
        rows = torch.arange(h, device=f.device)[None, :, None] >= sizes[:, level, 0, None, None]
        cols = torch.arange(w, device=f.device)[None, None, :] >= sizes[:, level, 1, None, None]
        masks.append(rows | cols)
    return masks


class Batching:
    """Batch semantics; see the module docstring. Subclasses override what differs."""

    name = "base"
    #: The selection policy used when the caller gives none.
    policy: SelectionPolicy = DEFAULT_POLICY

    def for_batch(self, batch: ImageBatch) -> Batching:
        """The semantics for this particular batch (may look at its sizes; eager only)."""
        return self

    def level_maps(self, neck: NeckFn, batch: ImageBatch, training: bool) -> LevelMaps:
        raise NotImplementedError

    def attention_mask(self, padding_mask: Tensor) -> Tensor | None:
        """``[B, N]`` padding mask as deformable attention gets it (None: nothing to mask)."""
        return padding_mask

    def rank_foreground(self, logits: Tensor, padding_mask: Tensor) -> Tensor:
        """``[B, N]`` foreground logits -> ranking scores with padded tokens pushed to the bottom."""
        return logits.masked_fill(padding_mask, float("-inf"))

    def layer_budget(self, token_counts: Tensor, ratio: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens one encoder layer updates: ``(K, own [B])`` with ``K`` a 0-d int tensor (the batch's top-k
        size) and ``own[b]`` the leading slots image ``b`` writes back.

        ``token_counts [B]`` int32 foreground budgets, ``ratio`` float32 0-d (the cascade's fraction).
        """
        per_image = (ratio * token_counts.to(torch.float32)).int()
        return per_image.max(), per_image

    def mask_oesm(self, score: Tensor, own_slots: Tensor, num: int) -> tuple[Tensor, Tensor | None]:
        """OESM ranking ``score [B, K]`` restricted to each image's own slots ``[B, K]``, and the key padding
        mask ``[B, num]`` of the ``num`` chosen tokens (None: every chosen token is a key)."""
        return score, None

    def rank_proposals(self, scores: Tensor, padding_mask: Tensor) -> Tensor:
        """``[B, N]`` max class logit per token -> two-stage ranking scores."""
        return scores.masked_fill(padding_mask, float("-inf"))

    def query_padding(self, num_queries: int, valid_counts: Tensor) -> Tensor | None:
        """``[B, Q]`` True on query slots an image cannot fill (fewer tokens than queries), or None."""
        return None

    def position_scale(self, valid_ratios: Tensor) -> Tensor | None:
        """``[B, 1, 4]`` factor applied to the decoder's reference boxes before their position embedding, or
        None for the boxes themselves."""
        return None

    def __repr__(self) -> str:
        return f"<Batching {self.name}>"


class OfficialBatching(Batching):
    """``batch_mode="official"``: as the official code, results depend on the batch."""

    name = "official"
    policy = DEFAULT_POLICY

    def level_maps(self, neck: NeckFn, batch: ImageBatch, training: bool) -> LevelMaps:
        x = batch.tensor
        features = neck(x)
        if training:
            pixel_mask = batch.padding_mask.to(x.dtype)
        else:
            # Official eval quirk: padding counts as image (all-zero mask).
            pixel_mask = torch.zeros_like(batch.padding_mask, dtype=x.dtype)
        masks = [F.interpolate(pixel_mask[None], size=f.shape[-2:]).to(torch.bool)[0] for f in features]
        return LevelMaps(features, masks, None, None)

    def rank_foreground(self, logits: Tensor, padding_mask: Tensor) -> Tensor:
        # Official: padded tokens get the batch-wide minimum (they can still be selected).
        return logits.masked_fill(padding_mask, logits.min())

    def layer_budget(self, token_counts: Tensor, ratio: Tensor) -> tuple[Tensor, Tensor]:
        # Every image takes the batch's largest budget and writes back its own first n_b.
        return (ratio * token_counts.max().to(torch.float32)).int(), token_counts

    def rank_proposals(self, scores: Tensor, padding_mask: Tensor) -> Tensor:
        return scores

    def position_scale(self, valid_ratios: Tensor) -> Tensor | None:
        # The level-0 valid ratio: a query's position then depends on the batch padding.
        return torch.cat([valid_ratios[:, 0], valid_ratios[:, 0]], -1)[:, None]


class InvariantBatching(Batching):
    """``batch_mode="invariant"`` with images of different sizes: each image's result is its result alone."""

    name = "invariant"
    policy = STABLE_POLICY

    def for_batch(self, batch: ImageBatch) -> Batching:
        x, sizes = batch.tensor, batch.image_sizes
        full = bool((sizes[:, 0] == x.shape[2]).all() and (sizes[:, 1] == x.shape[3]).all())
        return UNPADDED if full else self

    def level_maps(self, neck: NeckFn, batch: ImageBatch, training: bool) -> LevelMaps:
        # Images of different sizes run through the backbone one by one: convolutions and GroupNorm would
        # otherwise see the batch padding, and an image's features would depend on its batch mates.
        x = batch.tensor
        per_image = []
        for b, (h, w) in enumerate(batch.image_sizes.tolist()):
            per_image.append(neck(x[b:b + 1, :, :h, :w]))
        features = []
        for level in range(len(per_image[0])):
            hmax = max(p[level].shape[2] for p in per_image)
            wmax = max(p[level].shape[3] for p in per_image)
            features.append(torch.cat([F.pad(p[level], (0, wmax - p[level].shape[3], 0, hmax - p[level].shape[2]))
                                       for p in per_image]))
        sizes = torch.tensor([[list(p[level].shape[-2:]) for level in range(len(p))] for p in per_image],
                             device=x.device)
        masks = _masks_from_sizes(features, sizes)
        return LevelMaps(features, masks, [~m.flatten(1) for m in masks], sizes)

    def mask_oesm(self, score: Tensor, own_slots: Tensor, num: int) -> tuple[Tensor, Tensor | None]:
        score = score.masked_fill(~own_slots, float("-inf"))
        # At least one key per image, so an image with no own slot here never attends over nothing (NaN).
        per_image_num = own_slots.sum(1).clamp(min=1, max=num)
        key_padding_mask = torch.arange(num, device=score.device)[None, :] >= per_image_num[:, None]
        return score, key_padding_mask if bool(key_padding_mask.any()) else None

    def query_padding(self, num_queries: int, valid_counts: Tensor) -> Tensor | None:
        mask = torch.arange(num_queries, device=valid_counts.device)[None, :] >= valid_counts[:, None]
        return mask if bool(mask.any()) else None


class UnpaddedBatching(InvariantBatching):
    """``batch_mode="invariant"`` for a batch whose images all fill the canvas: no padding anywhere, so the
    masks are empty and every image has the same budgets (same results as :class:`InvariantBatching`)."""

    name = "unpadded"

    def for_batch(self, batch: ImageBatch) -> Batching:
        return self

    def level_maps(self, neck: NeckFn, batch: ImageBatch, training: bool) -> LevelMaps:
        features = neck(batch.tensor)
        masks = [f.new_zeros(f.shape[0], f.shape[2], f.shape[3], dtype=torch.bool) for f in features]
        # All tokens count (a weighted mean with unit weights, as the padded path computes it).
        valid = [f.new_ones(f.shape[0], f.shape[2] * f.shape[3], dtype=torch.bool) for f in features]
        return LevelMaps(features, masks, valid, None)

    def attention_mask(self, padding_mask: Tensor) -> Tensor | None:
        return None

    def rank_foreground(self, logits: Tensor, padding_mask: Tensor) -> Tensor:
        return logits

    def mask_oesm(self, score: Tensor, own_slots: Tensor, num: int) -> tuple[Tensor, Tensor | None]:
        return score, None

    def rank_proposals(self, scores: Tensor, padding_mask: Tensor) -> Tensor:
        return scores

    def query_padding(self, num_queries: int, valid_counts: Tensor) -> Tensor | None:
        return None  # every image has all N >= Q tokens


OFFICIAL = OfficialBatching()
INVARIANT = InvariantBatching()
UNPADDED = UnpaddedBatching()


def batching_for(batch_mode: str) -> Batching:
    """The semantics of ``cfg.batch_mode`` (``"official"`` or ``"invariant"``)."""
    if batch_mode == "official":
        return OFFICIAL
    if batch_mode == "invariant":
        return INVARIANT
    raise ValueError(f"batch_mode must be 'official' or 'invariant', got {batch_mode!r}")
