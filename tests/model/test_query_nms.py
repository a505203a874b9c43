"""Distinct query selection (``decoder.query_nms_iou``): Fast NMS and the proposal demotion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import focus_detr
from focus_detr.model.detector import demote_duplicate_proposals
from focus_detr.model.selection import DEFAULT_POLICY
from focus_detr.ops.boxes import batched_box_iou, box_cxcywh_to_xyxy, box_iou, fast_nms_keep


def _random_boxes(generator: torch.Generator, batch: int, count: int) -> torch.Tensor:
    xy = torch.rand(batch, count, 2, generator=generator) * 50
    wh = torch.rand(batch, count, 2, generator=generator) * 30
    return torch.cat([xy, xy + wh], -1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), count=st.integers(1, 30),
       threshold=st.floats(0.05, 0.95))
def test_batched_iou_and_fast_nms_match_their_definitions(seed, batch, count, threshold):
    g = torch.Generator().manual_seed(seed)
    boxes = _random_boxes(g, batch, count)
    iou = batched_box_iou(boxes, boxes)
    keep = fast_nms_keep(boxes, threshold)
    for b in range(batch):
        assert torch.allclose(iou[b], box_iou(boxes[b], boxes[b])[0], atol=1e-6)
        for j in range(count):
            # Fast NMS: dropped iff some better box (lower index) overlaps it by more than the threshold.
            suppressed = any(float(iou[b, i, j]) > threshold for i in range(j))
            assert bool(keep[b, j]) == (not suppressed)
    assert keep[:, 0].all()


def test_identical_boxes_keep_only_the_best_and_empty_boxes_never_suppress():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30], [5, 5, 5, 5], [5, 5, 5, 5]]])
    assert fast_nms_keep(boxes, 0.7).tolist() == [[True, False, True, True, True]]


def test_demoted_duplicates_come_after_every_distinct_proposal():
    # Tokens 0-2 propose the same box, token 3 a distinct one; token 4 is excluded (-inf).
    scores = torch.tensor([[5.0, 4.0, 3.0, -2.0, float("-inf")]])
    same = torch.logit(torch.tensor([0.5, 0.5, 0.2, 0.2]))
    other = torch.logit(torch.tensor([0.1, 0.1, 0.05, 0.05]))
    coords = torch.stack([same, same, same, other, other])[None]
    ranked = demote_duplicate_proposals(scores, coords, num_queries=2, iou_threshold=0.7, policy=DEFAULT_POLICY)
    order = torch.sort(ranked, descending=True, stable=True)[1][0].tolist()
    assert order == [0, 3, 1, 2, 4]  # duplicates keep their own order, behind every distinct token
    assert ranked[0, 0] == 5.0 and ranked[0, 3] == -2.0 and ranked[0, 4] == float("-inf")


def test_model_with_query_nms_selects_distinct_proposals_and_trains():
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny", num_classes=3, **{"decoder.query_nms_iou": 0.5})
    assert model.cfg.decoder.query_nms_iou == 0.5
    # Untrained proposals sit on the token grid and rarely overlap: make the box head predict one large
    # box for every token, so all proposals are duplicates of each other.
    with torch.no_grad():
        model.proposal_box_head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 4.0, 4.0]))
    images = [torch.rand(3, 96, 128) * 255, torch.rand(3, 64, 96) * 255]
    batch = model.batch(images)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    boxes = box_cxcywh_to_xyxy(out.encoder_proposals.boxes)
    iou = batched_box_iou(boxes, boxes).triu(diagonal=1)
    plain = focus_detr.build_model("tiny", num_classes=3)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    with torch.no_grad():
        plain_out = plain(batch)
    plain_boxes = box_cxcywh_to_xyxy(plain_out.encoder_proposals.boxes)
    plain_iou = batched_box_iou(plain_boxes, plain_boxes).triu(diagonal=1)
    # The best proposal is the same; with NMS fewer later queries duplicate an earlier one.
    assert torch.equal(out.proposal_indices[:, 0], plain_out.proposal_indices[:, 0])
    duplicates = (iou.amax(1) > 0.5).float().mean()
    plain_duplicates = (plain_iou.amax(1) > 0.5).float().mean()
    assert duplicates < plain_duplicates
    # Training still works end to end (gradients flow, no error from the selection).
    model.train()
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])} for _ in images]
    out = model(batch, targets)
    (out.main.logits.sum() + out.encoder_proposals.logits.sum() + out.encoder_proposals.boxes.sum()).backward()
    for module in (model.proposal_class_head, model.proposal_box_head, model.class_heads[-1], model.backbone):
        assert all(p.grad is not None for p in module.parameters())


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.5, 2, "0.5", True])
def test_query_nms_iou_out_of_range_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="decoder.query_nms_iou"):
        focus_detr.build_model("tiny", **{"decoder.query_nms_iou": bad})


def test_proposal_boxes_computed_for_the_selected_tokens_only():
    """Without query_nms_iou the proposal box head runs on the Q selected rows, not on all N tokens; its rows
    are the ones the official all-token computation would have gathered."""
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny", num_classes=3).eval()
    calls = {"class": [], "box": []}
    model.proposal_class_head.register_forward_hook(lambda m, i, o: calls["class"].append(i[0]))
    model.proposal_box_head.register_forward_hook(lambda m, i, o: calls["box"].append((i[0], o)))
    batch = model.batch([torch.rand(3, 96, 128), torch.rand(3, 80, 112)])
    with torch.no_grad():
        out = model(batch)
    # The encoder's category scores use the class head too; query selection calls it on all N tokens (for the
    # ranking), then on the Q selected ones.
    all_tokens = calls["class"][-2]
    assert all_tokens.shape[1] == out.token_padding_mask.shape[1]
    (box_input, box_output), = calls["box"]
    ids = out.proposal_indices
    assert box_input.shape[1] == ids.shape[1] < all_tokens.shape[1]
    gathered = torch.gather(all_tokens, 1, ids[..., None].expand(-1, -1, all_tokens.shape[-1]))
    assert torch.equal(box_input, gathered)
    with torch.no_grad():
        full = model.proposal_box_head(all_tokens)
    expected = torch.gather(full, 1, ids[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(box_output, expected, rtol=1e-5, atol=1e-5)
