"""What the detector returns. The criterion, post-processing and visualisation read these fields."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class Predictions:
    """One set of box predictions.

    logits: ``[B, Q, num_classes]`` raw class logits (sigmoid / focal convention, no background class).
    boxes:  ``[B, Q, 4]`` sigmoid boxes, ``(cx, cy, w, h)`` normalised by the image's valid region
            (in ``batch_mode="official"`` eval: by the padded canvas, as the official code).
    """

    logits: Tensor
    boxes: Tensor


@dataclass
class DenoisingOutputs:
    """Predictions of the contrastive denoising queries of every decoder layer (training only).

    logits / boxes: ``[num_decoder_layers, B, P, ...]`` with ``P = 2 * max_gt * num_groups``. Group ``g``
    occupies slots ``[2 g max_gt, 2 (g + 1) max_gt)``: ``max_gt`` positive copies then ``max_gt`` negatives.
    """

    logits: Tensor
    boxes: Tensor
    num_groups: int
    max_gt: int


@dataclass
class EncoderTrace:
    """Discrete decisions of the encoder, for explanation, tests and parity checks.

    token_counts:         ``[B]`` foreground tokens per image (``int(keep_ratio * valid) + 1``); all tokens
                          in dense mode.
    selected_indices:     per encoder layer, ``[B, K_l]`` token ids updated by that layer, highest
                          foreground score first (``[B, N]`` arange in dense mode).
    selected_valid:       per layer, ``[B, K_l]`` bool, False on slots that are padding of a smaller image
                          (``invariant`` mode only; all True otherwise).
    oesm_indices:         per layer, ``[B, M]`` token ids that took part in the object-enhanced
                          self-attention (focus mode only, else empty list).
    """

    token_counts: Tensor
    selected_indices: list[Tensor] = field(default_factory=list)
    selected_valid: list[Tensor] = field(default_factory=list)
    oesm_indices: list[Tensor] = field(default_factory=list)


@dataclass
class FocusDETROutputs:
    """Everything one forward pass produces.

    main:               final decoder layer predictions.
    aux:                predictions of decoder layers ``0 .. L-2`` (in order).
    encoder_proposals:  the two-stage proposals (top-Q encoder tokens) with their class logits and boxes.
    denoising:          denoising predictions, or None (eval, no targets, or denoising disabled).
    foreground_logits:  ``[B, N]`` raw token foreground logits before any masking, or None in dense mode.
    spatial_shapes:     ``[L, 2]`` long ``(H_l, W_l)`` of each feature level, finest first.
    level_start_index:  ``[L]`` long, offset of each level in the flattened token sequence.
    valid_ratios:       ``[B, L, 2]`` ``(w, h)`` fraction of each level covered by the image.
    token_padding_mask: ``[B, N]`` bool, True on tokens that fall in padding.
    image_sizes:        ``[B, 2]`` long ``(h, w)`` of the network input before padding.
    proposal_indices:   ``[B, Q]`` token ids chosen as two-stage proposals, in query order.
    encoder_trace:      see :class:`EncoderTrace`.
    """

    main: Predictions
    aux: list[Predictions]
    encoder_proposals: Predictions
    denoising: DenoisingOutputs | None
    foreground_logits: Tensor | None
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    token_padding_mask: Tensor
    image_sizes: Tensor
    proposal_indices: Tensor
    encoder_trace: EncoderTrace
    # Intermediate tensors exposed for parity tests and visualisation (not needed for training).
    memory: Tensor | None = None  # [B, N, C] encoder output
    reference_boxes: list[Tensor] = field(default_factory=list)  # per decoder layer [B, Q, 4] refined boxes
    proposal_max_logits: Tensor | None = None  # [B, N] max-over-classes proposal logit of every token
    # [B, Q] True on queries that carry no prediction (an image with fewer valid tokens than queries, in
    # batch-invariant mode); None when every query is real. Matching and post-processing skip them.
    query_padding_mask: Tensor | None = None
