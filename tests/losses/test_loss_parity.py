"""Losses against the official Focus-DETR code, from the recorded arrays of every official-parity fixture.

Each fixture (``tests/fixtures/official_parity*``, plus any folder in ``$FOCUS_DETR_PARITY_FIXTURE``; the test
ids name it) holds the official training-mode outputs of a batch with GT boxes and denoising off, the official
Hungarian matches and the official **weighted** loss dict. We feed the recorded arrays into our losses, so no
model is involved and every discrete decision is the official one. Shapes, batch size, GT, matcher costs and
focal parameters all come from the fixture (:mod:`parity_utils`).

What is compared:

* ``foreground_targets`` on the fixture's spatial shapes == ``train_fg_targets`` (exact).
* ``HungarianMatcher`` on ``train_pred_*`` / ``train_enc_pred_*`` == ``train_match_{main,enc}_img{b}`` (exact).
* ``SetCriterion`` on a :class:`FocusDETROutputs` made of the recorded arrays: ``loss_{class,bbox,giou}``,
  ``..._enc`` and ``select_loss`` (from ``train_fg_score``), times our weights, == the official weighted
  values; the ``_dn`` keys are zero as in the official run; the normaliser is the number of GT boxes.
* The loss key set and the weight of every key == the official keys / weights.

The aux losses ``_0 ..`` and aux matches need the training-mode aux outputs, which the fixtures do not record;
``test_parity.py`` compares them from our own forward pass (decisions forced).

Tolerance: ``NOISE_FACTOR`` (10) x the largest relative difference of the official losses between the official
model and its float64 copy (``manifest.json -> calibration_max_abs_diff``). Here the inputs are the recorded
arrays themselves, so the only difference left is the float32 summation order.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from focus_detr.losses import foreground_targets
from focus_detr.losses.focal import foreground_focal_loss
from focus_detr.model.outputs import EncoderTrace, FocusDETROutputs, Predictions
from parity_utils import ParityFixture, fixture_params, load_fixture, record


@pytest.fixture(scope="module", params=fixture_params())
def fx(request) -> ParityFixture:
    return load_fixture(request.param)


@pytest.fixture(scope="module", params=["official_order", "collate_order"])
def targets(fx: ParityFixture, request: pytest.FixtureRequest) -> list[dict[str, torch.Tensor]]:
    """Normalised cxcywh float32 GT in the two orders of operations the code base uses (they differ by
    <= 1 ulp); both must give the official results."""
    return fx.targets("official" if request.param == "official_order" else "collate")


def _t(fx: ParityFixture, key: str) -> torch.Tensor:
    return torch.from_numpy(fx.array(key))


def _spatial_shapes(fx: ParityFixture) -> torch.Tensor:
    """Training runs on the same padded canvas as evaluation, so the levels are ``eval_spatial_shapes``."""
    return _t(fx, "eval_spatial_shapes").long()


def _recorded_outputs(fx: ParityFixture, num_aux: int) -> FocusDETROutputs:
    """FocusDETROutputs made of the recorded training arrays. ``aux`` holds ``num_aux`` copies of the main
    prediction (placeholders: the training aux outputs were not recorded)."""
    main = Predictions(logits=_t(fx, "train_pred_logits"), boxes=_t(fx, "train_pred_boxes"))
    return FocusDETROutputs(
        main=main,
        aux=[Predictions(logits=main.logits.clone(), boxes=main.boxes.clone()) for _ in range(num_aux)],
        encoder_proposals=Predictions(logits=_t(fx, "train_enc_pred_logits"), boxes=_t(fx, "train_enc_pred_boxes")),
        denoising=None,
        foreground_logits=_t(fx, "train_fg_score")[..., 0],
        spatial_shapes=_spatial_shapes(fx),
        level_start_index=_t(fx, "eval_level_start_index").long(),
        valid_ratios=_t(fx, "train_valid_ratios"),
        token_padding_mask=_t(fx, "train_token_padding_mask").bool(),
        image_sizes=fx.image_sizes(),
        proposal_indices=_t(fx, "train_enc_topk_inds").long(),
        encoder_trace=EncoderTrace(token_counts=_t(fx, "train_focus_token_nums").long()),
    )


def test_loss_parity_foreground_targets(fx, targets):
    fg = foreground_targets(_spatial_shapes(fx), fx.image_sizes(), targets)
    expected = fx.array("train_fg_targets").astype(np.float32)
    n = int(_spatial_shapes(fx).prod(1).sum())
    assert fg.shape == expected.shape == (fx.batch_size, n)
    np.testing.assert_array_equal(fg.numpy(), expected)
    # A non-trivial assignment: every image has foreground and background tokens.
    per_image = expected.sum(1)
    assert (per_image > 0).all() and (per_image < n).all()


@pytest.mark.parametrize("name,prefix", [("main", "train_pred"), ("enc", "train_enc_pred")])
def test_loss_parity_matcher(fx, targets, name, prefix):
    indices = fx.criterion().matcher(_t(fx, f"{prefix}_logits"), _t(fx, f"{prefix}_boxes"), targets)
    assert len(indices) == fx.batch_size
    for b, (query_idx, gt_idx) in enumerate(indices):
        expected = fx.array(f"train_match_{name}_img{b}").astype(np.int64)
        np.testing.assert_array_equal(np.stack([query_idx.numpy(), gt_idx.numpy()]), expected)


def test_loss_parity_weighted_losses(fx, targets):
    criterion = fx.criterion()
    weighted = criterion.weighted(criterion(_recorded_outputs(fx, num_aux=0), targets))
    official = fx.require("train_losses_weighted")
    assert criterion.last_num_boxes == float(sum(len(t["labels"]) for t in targets))

    rtol = fx.loss_rtol()
    compared = [f"loss_{n}{s}" for s in ("", "_enc") for n in ("class", "bbox", "giou")] + ["select_loss"]
    worst = max(abs(weighted[k].item() - official[k]) / abs(official[k]) for k in compared)
    record(fx, "loss_parity weighted losses from recorded outputs (relative)", worst, rtol, fx.loss_noise())
    for key in compared:
        np.testing.assert_allclose(weighted[key].item(), official[key], rtol=rtol, atol=0, err_msg=key)
    # No denoising in the official run: its dn entries are exact zeros, and so are ours.
    for key in ("loss_class_dn", "loss_bbox_dn", "loss_giou_dn"):
        assert weighted[key].item() == official[key] == 0.0
    # The criterion used the official matches, and its matcher indices are exposed.
    for b in range(fx.batch_size):
        for name in ("main", "enc"):
            q, g = criterion.last_indices[name][b]
            np.testing.assert_array_equal(np.stack([q.numpy(), g.numpy()]), fx.array(f"train_match_{name}_img{b}"))


def test_loss_parity_select_loss_and_literal_form(fx, targets):
    """select_loss from ``train_fg_score`` alone, and our stable focal form vs the official literal one."""
    logits = _t(fx, "train_fg_score")[..., 0]
    fg = foreground_targets(_spatial_shapes(fx), fx.image_sizes(), targets)
    stable = foreground_focal_loss(logits, fg)
    p = logits.sigmoid()
    p_t = p * fg + (1 - p) * (1 - fg)
    literal = -(0.25 * fg + 0.75 * (1 - fg)) * (1 - p_t) ** 2 * p_t.log()
    torch.testing.assert_close(stable, literal, rtol=1e-5, atol=1e-7)
    criterion = fx.criterion()
    select = ((stable.sum(1) / fg.sum(1).clamp(min=1)).mean() * criterion.weight_of("select_loss")).item()
    np.testing.assert_allclose(select, fx.require("train_losses_weighted")["select_loss"], rtol=fx.loss_rtol(), atol=0)


def test_loss_parity_keys_and_weights(fx, targets):
    """With ``L - 1`` aux outputs and no denoising we return the official keys, and our default weights are
    the official ones. Aux *values* are compared in test_parity.py (from our forward pass)."""
    criterion = fx.criterion()
    losses = criterion(_recorded_outputs(fx, num_aux=fx.cfg.decoder.num_layers - 1), targets)
    order = fx.require("train_loss_order")
    assert set(losses) == set(order)
    assert len(losses) == len(order)
    for key, weight in fx.require("train_loss_weights_applied").items():
        assert criterion.weight_of(key) == weight, key
    for key in order:
        if "_dn" in key:
            assert losses[key].item() == 0.0, key
