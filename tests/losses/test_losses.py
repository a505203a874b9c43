"""Unit tests of the losses: focal forms, matcher, GIoU edge cases, foreground targets, criterion.

Official-value parity lives in ``test_loss_parity.py``; here everything is built by hand on tiny tensors.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from focus_detr.losses import (
    HungarianMatcher,
    SetCriterion,
    default_weight_dict,
    foreground_focal_loss,
    foreground_targets,
    sigmoid_focal_loss,
)
from focus_detr.model.outputs import DenoisingOutputs, EncoderTrace, FocusDETROutputs, Predictions
from focus_detr.ops.boxes import box_cxcywh_to_xyxy, generalized_box_iou

# --------------------------------------------------------------------------- helpers

NUM_CLASSES = 5
NUM_QUERIES = 7
SPATIAL_SHAPES = [[4, 5], [2, 3]]  # padded canvas 32 x 40 at strides 8 / 16
STRIDES = (8, 16)
SCALE_RANGES = ((-1.0, 12.0), (12.0, math.inf))
IMAGE_SIZES = [[32, 40], [24, 32]]  # (h, w); image 1 is padded


def make_targets(counts: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        out.append(
            {
                "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g),
                "boxes": torch.cat([centre, size], dim=-1),
            }
        )
    return out


def random_predictions(batch: int, queries: int, g: torch.Generator, lead: tuple[int, ...] = ()) -> Predictions:
    logits = torch.randn(*lead, batch, queries, NUM_CLASSES, generator=g)
    centres = torch.rand(*lead, batch, queries, 2, generator=g) * 0.8 + 0.1
    sizes = torch.rand(*lead, batch, queries, 2, generator=g) * 0.4 + 0.05
    boxes = torch.cat([centres, sizes], dim=-1)
    return Predictions(logits=logits.requires_grad_(), boxes=boxes.requires_grad_())


def make_outputs(
    batch: int = 2,
    num_aux: int = 2,
    denoising: tuple[int, int] | None = None,
    with_foreground: bool = True,
    seed: int = 0,
) -> FocusDETROutputs:
    """Small random outputs. ``denoising = (num_groups, max_gt)`` adds DN predictions for every layer."""
    g = torch.Generator().manual_seed(seed)
    num_tokens = sum(h * w for h, w in SPATIAL_SHAPES)
    dn = None
    if denoising is not None:
        num_groups, max_gt = denoising
        p = random_predictions(batch, 2 * max_gt * num_groups, g, lead=(num_aux + 1,))
        dn = DenoisingOutputs(logits=p.logits, boxes=p.boxes, num_groups=num_groups, max_gt=max_gt)
    return FocusDETROutputs(
        main=random_predictions(batch, NUM_QUERIES, g),
        aux=[random_predictions(batch, NUM_QUERIES, g) for _ in range(num_aux)],
        encoder_proposals=random_predictions(batch, NUM_QUERIES, g),
        denoising=dn,
        foreground_logits=torch.randn(batch, num_tokens, generator=g).requires_grad_() if with_foreground else None,
        spatial_shapes=torch.tensor(SPATIAL_SHAPES),
        level_start_index=torch.tensor([0, 20]),
        valid_ratios=torch.ones(batch, len(SPATIAL_SHAPES), 2),
        token_padding_mask=torch.zeros(batch, num_tokens, dtype=torch.bool),
        image_sizes=torch.tensor(IMAGE_SIZES[:batch]),
        proposal_indices=torch.zeros(batch, NUM_QUERIES, dtype=torch.int64),
        encoder_trace=EncoderTrace(token_counts=torch.full((batch,), num_tokens)),
    )


def make_criterion(num_decoder_layers: int = 3) -> SetCriterion:
    return SetCriterion(
        NUM_CLASSES,
        HungarianMatcher(),
        num_decoder_layers=num_decoder_layers,
        foreground_strides=STRIDES,
        foreground_scale_ranges=SCALE_RANGES,
    )


# --------------------------------------------------------------------------- focal losses


def test_sigmoid_focal_loss_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 9, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(64, 9, generator=g) < 0.3).double()
    p = x.sigmoid()
    p_t = p * t + (1 - p) * (1 - t)
    direct = -(0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * p_t.log()
    torch.testing.assert_close(sigmoid_focal_loss(x, t), direct, rtol=1e-10, atol=1e-12)
    # alpha < 0 switches the class weighting off; gamma is the exponent.
    torch.testing.assert_close(sigmoid_focal_loss(x, t, alpha=-1, gamma=1.0), -(1 - p_t) * p_t.log())


def test_foreground_focal_loss_equals_literal_form_in_normal_range():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4096, generator=g) * 5  # float32, |x| up to ~20: the literal form is finite here
    x = x.clamp(-15, 15)
    t = (torch.rand(4096, generator=g) < 0.2).float()
    p = x.sigmoid()
    p_t = p * t + (1 - p) * (1 - t)
    literal = -(0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * p_t.log()
    assert torch.isfinite(literal).all()
    stable = foreground_focal_loss(x, t)
    # Compare where the literal form is itself accurate: for |x| >~ 4 its 1 - sigmoid(x) loses digits to
    # cancellation (2e-5 relative at |x| = 7), which is the literal form's error, not ours.
    accurate = x.abs() < 4
    torch.testing.assert_close(stable[accurate], literal[accurate], rtol=1e-5, atol=1e-7)
    # Everywhere: the stable float32 value equals the float64 reference.
    x64, t64 = x.double(), t.double()
    p_t64 = x64.sigmoid() * t64 + (1 - x64.sigmoid()) * (1 - t64)
    ref64 = -(0.25 * t64 + 0.75 * (1 - t64)) * (1 - p_t64) ** 2 * p_t64.log()
    torch.testing.assert_close(stable.double(), ref64, rtol=1e-5, atol=1e-7)


def test_foreground_focal_loss_is_finite_where_the_literal_form_overflows():
    x = torch.tensor([20.0, 50.0, 1000.0, -100.0, -1000.0], requires_grad=True)
    t = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    p = x.detach().sigmoid()
    p_t = p * t + (1 - p) * (1 - t)
    literal = -(0.25 * t + 0.75 * (1 - t)) * (1 - p_t) ** 2 * p_t.log()
    assert torch.isinf(literal[1:]).all()  # what the official code computes
    stable = foreground_focal_loss(x, t)
    assert torch.isfinite(stable).all()
    # Confidently wrong: the loss grows like weight * |x|.
    expected = torch.tensor([0.75 * 50, 0.75 * 1000, 0.25 * 100, 0.25 * 1000])
    torch.testing.assert_close(stable[1:], expected, rtol=1e-5, atol=0)
    stable.sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- GIoU


def test_generalized_box_iou_edge_cases():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    same = generalized_box_iou(a, a)
    torch.testing.assert_close(same, torch.ones(1, 1), rtol=0, atol=2e-6)
    # Touching boxes: IoU 0, enclosing box has no empty space -> GIoU 0.
    touching = generalized_box_iou(a, torch.tensor([[1.0, 0.0, 2.0, 1.0]]))
    torch.testing.assert_close(touching, torch.zeros(1, 1), rtol=0, atol=1e-6)
    # Far apart: tends to -1.
    far = generalized_box_iou(a, torch.tensor([[100.0, 100.0, 101.0, 101.0]]))
    assert -1.0 < far.item() < -0.99
    # Degenerate (zero-area) boxes stay finite thanks to the eps in both denominators.
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    assert torch.isfinite(generalized_box_iou(point, point)).all()
    assert torch.isfinite(generalized_box_iou(point, a)).all()
    # Random boxes: GIoU in [-1, 1], symmetric, and the loss 1 - GIoU in [0, 2].
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.cat([torch.rand(20, 2, generator=g), torch.rand(20, 2, generator=g) * 0.5 + 0.01], dim=-1)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    giou = generalized_box_iou(xyxy, xyxy)
    assert (giou <= 1 + 1e-6).all() and (giou >= -1 - 1e-6).all()
    torch.testing.assert_close(giou, giou.T)


# --------------------------------------------------------------------------- matcher


def test_matcher_recovers_permutation_of_perfect_predictions():
    targets = make_targets([4, 3], seed=3)
    g = torch.Generator().manual_seed(0)
    logits = torch.full((2, NUM_QUERIES, NUM_CLASSES), -8.0)
    centres = torch.rand(2, NUM_QUERIES, 2, generator=g) * 0.8 + 0.1
    boxes = torch.cat([centres, torch.full((2, NUM_QUERIES, 2), 0.05)], dim=-1)
    placements = [torch.tensor([5, 0, 3, 6]), torch.tensor([2, 4, 1])]
    for b, (t, q) in enumerate(zip(targets, placements)):
        boxes[b, q] = t["boxes"]
        logits[b, q, t["labels"]] = 8.0
    indices = HungarianMatcher()(logits, boxes, targets)
    for (query_idx, gt_idx), q in zip(indices, placements):
        assert query_idx.dtype == gt_idx.dtype == torch.int64
        assert torch.equal(query_idx, q.sort().values)  # scipy returns rows sorted
        assert torch.equal(q[gt_idx], query_idx)  # GT j went to the query that holds it


def test_matcher_is_optimal_against_brute_force():
    """Tiny case: compare with a float64 hand-written cost and exhaustive search (validates the cost)."""
    g = torch.Generator().manual_seed(7)
    targets = make_targets([3], seed=11)
    queries = 5
    logits = torch.randn(1, queries, NUM_CLASSES, generator=g, dtype=torch.float64)
    centres = torch.rand(1, queries, 2, generator=g, dtype=torch.float64) * 0.8 + 0.1
    sizes = torch.rand(1, queries, 2, generator=g, dtype=torch.float64) * 0.4 + 0.05
    boxes = torch.cat([centres, sizes], dim=-1)
    tgt = {"labels": targets[0]["labels"], "boxes": targets[0]["boxes"].double()}
    p = logits[0].sigmoid()[:, tgt["labels"]]  # [Q, n]
    cost_class = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p**2 * -(1 - p + 1e-8).log()
    cost_l1 = (boxes[0][:, None] - tgt["boxes"][None]).abs().sum(-1)
    cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes[0]), box_cxcywh_to_xyxy(tgt["boxes"]))
    cost = 5 * cost_l1 + 2 * cost_class + 2 * cost_giou
    best = min(
        itertools.permutations(range(queries), 3), key=lambda qs: sum(cost[q, j].item() for j, q in enumerate(qs))
    )
    (query_idx, gt_idx), = HungarianMatcher()(logits, boxes, [tgt])
    got = {int(j): int(q) for q, j in zip(query_idx, gt_idx)}
    assert got == {j: q for j, q in enumerate(best)}


def test_matcher_splits_batch_cost_per_image_and_handles_empty_images():
    targets = make_targets([2, 0, 3], seed=5)
    g = torch.Generator().manual_seed(1)
    pred = random_predictions(3, NUM_QUERIES, g)
    indices = HungarianMatcher()(pred.logits, pred.boxes, targets)
    assert [len(q) for q, _ in indices] == [2, 0, 3]
    assert indices[1][0].dtype == torch.int64 and indices[1][1].numel() == 0
    # Image 2 matched on its own gives the same result (the batch matrix is split block-diagonally).
    alone = HungarianMatcher()(pred.logits[2:], pred.boxes[2:], targets[2:])
    assert torch.equal(alone[0][0], indices[2][0]) and torch.equal(alone[0][1], indices[2][1])
    # No GT at all in the batch.
    empty = HungarianMatcher()(pred.logits[:2], pred.boxes[:2], make_targets([0, 0]))
    assert all(q.numel() == 0 and j.numel() == 0 for q, j in empty)
    assert not any(t.requires_grad for pair in indices for t in pair)
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


# --------------------------------------------------------------------------- foreground targets


def _foreground_targets_loop(spatial_shapes, image_sizes, targets, strides, scale_ranges):
    """Per-token, per-box Python reference of the official GenTargets rule."""
    rows = []
    for b, t in enumerate(targets):
        h, w = image_sizes[b]
        gt = box_cxcywh_to_xyxy(t["boxes"] * torch.tensor([w, h, w, h], dtype=torch.float32)).tolist()
        labels = []
        for (hl, wl), s, (lo, hi) in zip(spatial_shapes, strides, scale_ranges):
            for i in range(hl):
                for j in range(wl):
                    x, y = j * s + s // 2, i * s + s // 2
                    fg = 0.0
                    for x0, y0, x1, y1 in gt:
                        d = (x - x0, y - y0, x1 - x, y1 - y)
                        if min(d) > 0 and lo < max(d) <= hi:
                            fg = 1.0
                    labels.append(fg)
        rows.append(labels)
    return torch.tensor(rows)


def test_foreground_targets_hand_case():
    # One 16 x 16 px box at (4, 4)-(20, 20) in a 32 x 40 image; level 0 (stride 8) has centres 4, 12, 20, ...
    box = torch.tensor([[12 / 40, 12 / 32, 16 / 40, 16 / 32]])
    targets = [{"labels": torch.zeros(1, dtype=torch.int64), "boxes": box}]
    fg = foreground_targets(torch.tensor(SPATIAL_SHAPES), torch.tensor([[32, 40]]), targets, STRIDES, SCALE_RANGES)
    level0 = fg[0, :20].view(4, 5)
    expected0 = torch.zeros(4, 5)
    expected0[1, 1] = 1.0  # centre (12, 12): l=t=r=b=8 <= 12. Centres at 4 or 20 lie on the edge: not strictly inside.
    assert torch.equal(level0, expected0)
    # Level 1 (stride 16, centres 8, 24, 40): (8, 8) is inside with max distance 12, not > 12 -> background.
    assert fg[0, 20:].sum() == 0


def test_foreground_targets_match_loop_reference_with_padding_and_empty_images():
    targets = make_targets([3, 0, 4], seed=9)
    # Add a large box so that the coarse level (max distance > 12 px) gets positives too.
    big = torch.tensor([[0.5, 0.45, 0.8, 0.7]])
    targets[0] = {
        "labels": torch.cat([targets[0]["labels"], torch.tensor([1])]),
        "boxes": torch.cat([targets[0]["boxes"], big]),
    }
    sizes = [[32, 40], [32, 40], [24, 32]]
    fg = foreground_targets(torch.tensor(SPATIAL_SHAPES), torch.tensor(sizes), targets, STRIDES, SCALE_RANGES)
    ref = _foreground_targets_loop(SPATIAL_SHAPES, sizes, targets, STRIDES, SCALE_RANGES)
    assert fg.dtype == torch.float32 and fg.shape == (3, 26)
    assert torch.equal(fg, ref)
    assert fg[1].sum() == 0 and fg[0].sum() > 0 and fg[2].sum() > 0 and fg[0, 20:].sum() > 0
    # Boxes of the padded image are scaled by its own size, so no token beyond it is foreground.
    level0 = fg[2, :20].view(4, 5)
    assert level0[3:].sum() == 0 and level0[:, 4:].sum() == 0
    # A batch with no GT at all.
    shapes, no_gt = torch.tensor(SPATIAL_SHAPES), make_targets([0, 0])
    none = foreground_targets(shapes, torch.tensor(sizes[:2]), no_gt, STRIDES, SCALE_RANGES)
    assert none.shape == (2, 26) and none.sum() == 0


# --------------------------------------------------------------------------- criterion


def _expected_set_losses(pred: Predictions, targets, indices, normaliser: float) -> dict[str, torch.Tensor]:
    """Straightforward per-image reference of loss_class / loss_bbox / loss_giou."""
    onehot = torch.zeros_like(pred.logits)
    l1 = torch.zeros(())
    giou = torch.zeros(())
    for b, (q, j) in enumerate(indices):
        for qi, ji in zip(q.tolist(), j.tolist()):
            onehot[b, qi, targets[b]["labels"][ji]] = 1
            src, tgt = pred.boxes[b, qi], targets[b]["boxes"][ji]
            l1 = l1 + (src - tgt).abs().sum()
            pair_giou = generalized_box_iou(box_cxcywh_to_xyxy(src[None]), box_cxcywh_to_xyxy(tgt[None]))[0, 0]
            giou = giou + 1 - pair_giou
    p = pred.logits.sigmoid()
    p_t = p * onehot + (1 - p) * (1 - onehot)
    focal = -(0.25 * onehot + 0.75 * (1 - onehot)) * (1 - p_t) ** 2 * p_t.log()
    return {"loss_class": focal.sum() / normaliser, "loss_bbox": l1 / normaliser, "loss_giou": giou / normaliser}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_criterion_keys_values_and_weights_without_denoising():
    outputs = make_outputs(num_aux=2)
    targets = make_targets([3, 2])
    criterion = make_criterion(num_decoder_layers=3)
    losses = criterion(outputs, targets)
    suffixes = ("", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1")
    expected_keys = {f"loss_{n}{s}" for n in ("class", "bbox", "giou") for s in suffixes}
    assert set(losses) == expected_keys | {"select_loss"}
    assert criterion.last_num_boxes == 5.0
    for key in ("main", "aux_0", "aux_1", "enc"):
        assert [len(q) for q, _ in criterion.last_indices[key]] == [3, 2]
    # Each set of predictions is matched separately and scored against the same normaliser.
    cases = [(outputs.main, "", "main"), (outputs.aux[1], "_1", "aux_1"), (outputs.encoder_proposals, "_enc", "enc")]
    for pred, suffix, key in cases:
        ref = _expected_set_losses(pred, targets, criterion.last_indices[key], 5.0)
        for name, value in ref.items():
            _close(losses[name + suffix], value)
    for s in ("_dn", "_dn_0", "_dn_1"):
        for n in ("class", "bbox", "giou"):
            assert losses[f"loss_{n}{s}"].item() == 0.0
    # weighted / total
    weighted = criterion.weighted(losses)
    assert weighted["loss_bbox_1"].item() == pytest.approx(5 * losses["loss_bbox_1"].item())
    assert weighted["loss_giou_enc"].item() == pytest.approx(2 * losses["loss_giou_enc"].item())
    assert weighted["select_loss"].item() == pytest.approx(1.5 * losses["select_loss"].item())
    total = criterion.total(losses)
    assert total.item() == pytest.approx(sum(v.item() for v in weighted.values()), rel=1e-6)


def test_aux_output_equal_to_main_gives_equal_losses():
    outputs = make_outputs(num_aux=1)
    outputs.aux[0] = Predictions(logits=outputs.main.logits, boxes=outputs.main.boxes)
    losses = make_criterion(2)(outputs, make_targets([2, 3]))
    for n in ("class", "bbox", "giou"):
        assert losses[f"loss_{n}_0"].item() == losses[f"loss_{n}"].item()


def test_select_loss_normalised_per_image_by_its_positives():
    outputs = make_outputs(num_aux=0)
    targets = make_targets([3, 2], seed=3)
    criterion = make_criterion(1)
    losses = criterion(outputs, targets)
    fg = foreground_targets(outputs.spatial_shapes, outputs.image_sizes, targets, STRIDES, SCALE_RANGES)
    assert (fg.sum(1) > 0).all()
    per_token = foreground_focal_loss(outputs.foreground_logits, fg)
    expected = torch.stack([per_token[b].sum() / fg[b].sum() for b in range(2)]).mean()
    _close(losses["select_loss"], expected)
    # Without foreground logits (dense mode) there is no select_loss key.
    assert "select_loss" not in criterion(make_outputs(num_aux=0, with_foreground=False), targets)


def test_criterion_without_any_ground_truth():
    outputs = make_outputs(num_aux=1)
    criterion = make_criterion(2)
    losses = criterion(outputs, make_targets([0, 0]))
    assert criterion.last_num_boxes == 1.0  # clamped
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou_enc"].item() == 0.0
    assert losses["loss_class"].item() > 0  # every query is background
    # select_loss: no positives, so the sum over all (background) tokens divided by 1.
    background = torch.zeros_like(outputs.foreground_logits)
    expected = foreground_focal_loss(outputs.foreground_logits, background).sum(1).mean()
    _close(losses["select_loss"], expected)
    criterion.total(losses).backward()
    assert outputs.main.logits.grad is not None and torch.isfinite(outputs.main.logits.grad).all()


def test_criterion_with_one_empty_image():
    outputs = make_outputs(num_aux=0)
    targets = make_targets([0, 3])
    criterion = make_criterion(1)
    losses = criterion(outputs, targets)
    assert criterion.last_num_boxes == 3.0
    assert [len(q) for q, _ in criterion.last_indices["main"]] == [0, 3]
    ref = _expected_set_losses(outputs.main, targets, criterion.last_indices["main"], 3.0)
    for name, value in ref.items():
        _close(losses[name], value)


def test_denoising_fixed_assignment_layers_and_normaliser():
    num_groups, max_gt = 3, 3
    outputs = make_outputs(num_aux=2, denoising=(num_groups, max_gt))
    targets = make_targets([3, 2])
    criterion = make_criterion(3)
    losses = criterion(outputs, targets)

    dn_indices = criterion.last_indices["dn"]
    # Group g occupies slots [2 g max_gt, 2 (g+1) max_gt); positives first; slot g*6 + j <-> GT j.
    assert dn_indices[0][0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert dn_indices[0][1].tolist() == [0, 1, 2] * 3
    assert dn_indices[1][0].tolist() == [0, 1, 6, 7, 12, 13]
    assert dn_indices[1][1].tolist() == [0, 1] * 3
    assert SetCriterion.denoising_indices(make_targets([0]), num_groups, max_gt)[0][0].numel() == 0

    normaliser = 5.0 * num_groups
    dn = outputs.denoising
    # Final layer -> "_dn", layer i -> "_dn_{i}".
    for layer, suffix in [(2, "_dn"), (0, "_dn_0"), (1, "_dn_1")]:
        pred = Predictions(logits=dn.logits[layer], boxes=dn.boxes[layer])
        ref = _expected_set_losses(pred, targets, dn_indices, normaliser)
        for name, value in ref.items():
            _close(losses[name + suffix], value)

    # Layer count must agree with the aux outputs.
    bad = make_outputs(num_aux=1, denoising=(num_groups, max_gt))
    bad.aux.append(bad.aux[0])
    bad.aux.append(bad.aux[0])
    with pytest.raises(ValueError):
        criterion(bad, targets)


def test_gradients_reach_every_prediction():
    outputs = make_outputs(num_aux=2, denoising=(2, 3))
    criterion = make_criterion(3)
    criterion.total(criterion(outputs, make_targets([3, 2]))).backward()
    tensors = [outputs.main.logits, outputs.main.boxes, outputs.encoder_proposals.logits]
    tensors += [outputs.encoder_proposals.boxes, outputs.foreground_logits]
    tensors += [outputs.denoising.logits, outputs.denoising.boxes]
    tensors += [t for aux in outputs.aux for t in (aux.logits, aux.boxes)]
    for t in tensors:
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # Denoising box gradients only reach positive slots of every layer.
    grad = outputs.denoising.boxes.grad  # [L, B, P, 4]
    positive = torch.zeros(grad.shape[:3], dtype=torch.bool)
    for b, (slots, _) in enumerate(criterion.last_indices["dn"]):
        positive[:, b, slots] = True
    assert (grad[~positive] == 0).all() and (grad[positive].abs().sum(-1) > 0).all()


def test_default_weight_dict_and_weight_lookup():
    weights = default_weight_dict(6)
    assert len(weights) == 40
    assert weights["select_loss"] == 1.5 and weights["loss_class_dn_4"] == 1.0 and weights["loss_bbox_enc"] == 5.0
    assert weights["loss_giou_3"] == 2.0
    # A custom dict: exact keys win, otherwise the base name's weight; select_loss from its own argument.
    custom = {"loss_class": 2.0, "loss_class_enc": 0.5, "loss_bbox": 1.0, "loss_giou": 1.0}
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(), weight_dict=custom, foreground_loss_weight=3.0)
    assert criterion.weight_of("loss_class_3") == 2.0
    assert criterion.weight_of("loss_class_enc") == 0.5
    assert criterion.weight_of("select_loss") == 3.0
    with pytest.raises(KeyError):
        criterion.weight_of("loss_class_dn")
    with pytest.raises(KeyError):
        criterion.weight_of("loss_mask")


# --------------------------------------------------------------------------- padded queries (batch-invariant mode)


def test_matcher_skips_padded_queries():
    targets = make_targets([2, 2], seed=4)
    logits = torch.full((2, NUM_QUERIES, NUM_CLASSES), -8.0)
    boxes = torch.full((2, NUM_QUERIES, 4), 0.5)
    mask = torch.zeros(2, NUM_QUERIES, dtype=torch.bool)
    mask[1, 4:] = True  # image 1 has only 4 real queries
    for b, t in enumerate(targets):
        # Perfect predictions sit on queries 5 and 6, which are padding for image 1.
        boxes[b, 5:7] = t["boxes"]
        logits[b, torch.tensor([5, 6]), t["labels"]] = 8.0
    plain = HungarianMatcher()(logits, boxes, targets)
    masked = HungarianMatcher()(logits, boxes, targets, query_padding_mask=mask)
    assert plain[1][0].tolist() == [5, 6]
    assert torch.equal(masked[0][0], plain[0][0]) and torch.equal(masked[0][1], plain[0][1])  # image 0 unaffected
    assert len(masked[1][0]) == 2 and (masked[1][0] < 4).all()
    assert masked[1][0].tolist() == sorted(masked[1][0].tolist())


def test_criterion_ignores_padded_queries():
    outputs = make_outputs(num_aux=1)
    mask = torch.zeros(2, NUM_QUERIES, dtype=torch.bool)
    mask[1, 3:] = True
    outputs.query_padding_mask = mask
    targets = make_targets([2, 2])
    criterion = make_criterion(2)
    losses = criterion(outputs, targets)
    for key in ("main", "aux_0", "enc"):
        assert (criterion.last_indices[key][1][0] < 3).all()
    # loss_class: the reference focal sum with the padded queries removed.
    ref_onehot = torch.zeros_like(outputs.main.logits)
    for b, (q, j) in enumerate(criterion.last_indices["main"]):
        ref_onehot[b, q, targets[b]["labels"][j]] = 1
    focal = sigmoid_focal_loss(outputs.main.logits, ref_onehot)
    _close(losses["loss_class"], focal[~mask].sum() / 4.0)
    criterion.total(losses).backward()
    for pred in (outputs.main, outputs.aux[0], outputs.encoder_proposals):
        assert (pred.logits.grad[1, 3:] == 0).all() and (pred.boxes.grad[1, 3:] == 0).all()
        assert pred.logits.grad[1, :3].abs().sum() > 0
