"""Numerical parity with the official Focus-DETR implementation, for every official-parity fixture.

Each fixture folder (``tests/fixtures/official_parity*``, plus any folder in ``FOCUS_DETR_PARITY_FIXTURE``;
the test ids name it) holds what the official detrex code computed for a batch of images, with weights set by a
fixed rule (its README is the contract). :mod:`parity_utils` reads everything from the folder: the preset
(from the official config file), the harness's config overrides, the weight rule's salt, which keys are
rule-filled (the others, e.g. Swin's ``relative_position_index``, keep what the model computes), the inputs and
the noise. We rebuild the weights, load them through :func:`focus_detr.load_official` and compare.

Tolerances: every float array must agree within ``NOISE_FACTOR`` (10) times the noise the fixture recorded for
that same array, i.e. the max difference between the official float32 model and its float64 copy with every
top-k decision forced (``manifest.json -> calibration_max_abs_diff``). The losses: 10 x the largest relative
difference of the 40 losses in the same calibration. Integer results (token sets, decisions, matches,
foreground targets) must be equal. Where a fixture records no noise for an array, the test fails and says so.

Discrete decisions: the foreground, OESM and proposal *sets* are compared free-running (the fixtures were
chosen so that their boundary margins are about ten times the noise). The *order* inside them is not robust
(near-ties, and on Swin exact ties between identical windows), so order differences are allowed only where
the official scores are within the tolerance, and the decoder comparisons run with the recorded decisions
forced through a :class:`~focus_detr.SelectionPolicy`.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import focus_detr
from focus_detr.model.selection import SelectionPolicy
from parity_utils import ParityFixture, assert_close, fixture_params, load_fixture, record


class RecordedPolicy(SelectionPolicy):
    """Takes every top-k decision from the fixture (prefix ``eval_`` or ``train_``)."""

    def __init__(self, fx: ParityFixture, prefix: str) -> None:
        self.fx = fx
        self.prefix = prefix

    def _get(self, name: str, k: int) -> torch.Tensor:
        value = torch.from_numpy(self.fx.array(self.prefix + name).astype(np.int64))
        assert value.shape[1] == k, f"{name}: the model asked for {k}, the fixture has {value.shape[1]}"
        return value

    def foreground(self, scores, k, layer):
        return self._get(f"fg_inds_l{layer}", k)

    def oesm(self, scores, k, layer):
        return self._get(f"oesm_inds_l{layer}", k)

    def proposals(self, scores, k):
        return self._get("enc_topk_inds", k)

    def detections(self, scores, k):
        idx = self._get("det_topk_flat_inds", k)
        return torch.gather(scores, 1, idx), idx


@pytest.fixture(scope="module", params=fixture_params())
def fx(request) -> ParityFixture:
    return load_fixture(request.param)


@pytest.fixture(scope="module")
def loaded(fx):
    torch.set_num_threads(2)  # as the official runs
    state = fx.official_state_dict(focus_detr.build_model(fx.cfg))
    model, report = focus_detr.load_official(state, fx.preset, return_report=True, **fx.overrides)
    return model, report, state


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="module")
def batch(model, fx):
    return model.batch(fx.images())


def _layer_outputs(model, run):
    """Run ``run()`` while recording each encoder layer's output for its selected tokens."""
    captured = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out.detach()))
             for i, layer in enumerate(model.encoder.layers)]
    try:
        result = run()
    finally:
        for h in hooks:
            h.remove()
    return result, captured


@pytest.fixture(scope="module")
def eval_free(model, batch):
    with torch.no_grad():
        return _layer_outputs(model, lambda: model(batch))


@pytest.fixture(scope="module")
def eval_forced(model, batch, fx):
    with torch.no_grad():
        return _layer_outputs(model, lambda: model(batch, policy=RecordedPolicy(fx, "eval_")))


def _exact(fx: ParityFixture, ours: torch.Tensor | np.ndarray, name: str) -> None:
    ours_np = ours.numpy() if isinstance(ours, torch.Tensor) else ours
    np.testing.assert_array_equal(ours_np, fx.array(name), err_msg=f"{fx.name}: {name}")


# ---- the fixture, the config and the weights ------------------------------------------------------------
def test_parity_fixture_is_interpretable(fx):
    """Config, keys, inputs and arrays agree with each other (load_fixture checked the config already)."""
    assert len(fx.keys) == fx.require("num_state_dict_keys")
    b = fx.batch_size
    n = int(np.prod(fx.array("eval_spatial_shapes"), axis=1).sum())
    assert fx.array("eval_fg_score").shape == (b, n, 1)
    assert fx.array("train_fg_targets").shape == (b, n)
    assert len(fx.require("train_loss_order")) == fx.array("train_loss_values").shape[0]
    np.testing.assert_array_equal(fx.array("train_loss_values"),
                                  [fx.require("train_losses_weighted")[k] for k in fx.require("train_loss_order")])


def test_parity_parameter_count_matches_official(model, fx):
    # Our module tree holds each tensor once, so the unique-parameter count must be exact.
    assert sum(p.numel() for p in model.parameters()) == fx.require("num_params_unique")


def test_parity_every_official_key_is_used_unchanged(loaded, fx):
    model, report, state = loaded
    assert report.unconverted == []
    assert len(report.converted) + len(report.aliases) == fx.require("num_state_dict_keys")
    ours = model.state_dict()
    for official, mine in report.converted.items():
        assert torch.equal(ours[mine], state[official]), f"{official} -> {mine} changed on loading"


# ---- free-running inference -------------------------------------------------------------------------
def test_parity_layout_and_scores(eval_free, fx):
    out, _ = eval_free
    _exact(fx, out.spatial_shapes, "eval_spatial_shapes")
    _exact(fx, out.level_start_index, "eval_level_start_index")
    assert_close(fx, "eval", out.valid_ratios, fx.array("eval_valid_ratios"), "valid_ratios")
    assert_close(fx, "eval", out.foreground_logits[..., None], fx.array("eval_fg_score"), "fg_score")
    _exact(fx, out.encoder_trace.token_counts, "eval_focus_token_nums")


def test_parity_free_running_token_sets(eval_free, fx):
    """Foreground and OESM token sets of every layer (their order within a set may differ on near-ties)."""
    trace = eval_free[0].encoder_trace
    assert len(trace.selected_indices) == fx.cfg.encoder.num_layers
    for layer in range(fx.cfg.encoder.num_layers):
        ours = trace.selected_indices[layer].numpy()
        official = fx.array(f"eval_fg_inds_l{layer}")
        assert ours.shape == official.shape, f"layer {layer}: {ours.shape} tokens vs official {official.shape}"
        ours_oesm = trace.oesm_indices[layer].numpy()
        official_oesm = fx.array(f"eval_oesm_token_ids_l{layer}")
        assert ours_oesm.shape == official_oesm.shape
        for b in range(fx.batch_size):
            assert set(ours[b]) == set(official[b]), f"foreground set differs, layer {layer} image {b}"
            assert set(ours_oesm[b]) == set(official_oesm[b]), f"OESM set differs, layer {layer} image {b}"


def test_parity_free_running_memory_and_proposals(eval_free, fx):
    out, layers = eval_free
    channels = fx.array("eval_memory_ch0_32").shape[-1]  # the fixture records the first 32 channels
    assert_close(fx, "eval", out.memory[..., :channels], fx.array("eval_memory_ch0_32"), "memory_ch0_32")
    assert_close(fx, "eval", out.memory.sum(-1), fx.array("eval_memory_chsum"), "memory_chsum")
    assert_close(fx, "eval", out.proposal_max_logits, fx.array("eval_enc_all_token_max_logit"),
                 "enc_all_token_max_logit")
    # Encoder layer outputs, aligned by token id (the order inside a selection may differ on near-ties).
    assert sorted(layers) == list(range(fx.cfg.encoder.num_layers))
    for layer, value in layers.items():
        ids = out.encoder_trace.selected_indices[layer].numpy()
        official_ids = fx.array(f"eval_fg_inds_l{layer}")
        ours_sum = value.sum(-1).numpy()
        aligned = np.stack([ours_sum[b][[{t: i for i, t in enumerate(ids[b])}[t] for t in official_ids[b]]]
                            for b in range(fx.batch_size)])
        assert_close(fx, "eval", aligned, fx.array(f"eval_enc_layer_out_chsum_l{layer}"),
                     f"enc_layer_out_chsum_l{layer}", f"enc_layer_out_chsum_l{layer}__aligned_by_token")


def test_parity_free_running_proposal_ranking(eval_free, fx):
    """The top-Q set is equal; a position may differ only where the official scores of the two tokens are
    closer than the proposal-score tolerance (a swap there is float noise, not a bug)."""
    out, _ = eval_free
    ours = out.proposal_indices.numpy()
    official = fx.array("eval_enc_topk_inds")
    assert ours.shape == official.shape
    scores = fx.array("eval_enc_all_token_max_logit")
    tolerance = fx.atol("eval", "enc_all_token_max_logit")
    worst = 0.0
    for b in range(fx.batch_size):
        assert set(ours[b]) == set(official[b]), f"image {b}: the proposal set differs"
        for pos in np.nonzero(ours[b] != official[b])[0]:
            gap = abs(float(scores[b][ours[b][pos]]) - float(scores[b][official[b][pos]]))
            worst = max(worst, gap)
            assert gap <= tolerance, f"image {b} query {pos}: order differs with official score gap {gap:.3g}"
    record(fx, "eval_enc_topk_order_swap_score_gap", worst, tolerance, None)


# ---- decisions forced ----------------------------------------------------------------------------------
def test_parity_forced_encoder_and_proposals(eval_forced, fx):
    out, layers = eval_forced
    for layer, value in layers.items():
        _exact(fx, out.encoder_trace.selected_indices[layer], f"eval_fg_inds_l{layer}")
        assert_close(fx, "eval", value.sum(-1), fx.array(f"eval_enc_layer_out_chsum_l{layer}"),
                     f"enc_layer_out_chsum_l{layer}", f"enc_layer_out_chsum_l{layer}__aligned_by_token")
        _exact(fx, out.encoder_trace.oesm_indices[layer], f"eval_oesm_token_ids_l{layer}")
    _exact(fx, out.proposal_indices, "eval_enc_topk_inds")
    assert_close(fx, "eval", out.encoder_proposals.logits, fx.array("eval_enc_pred_logits"), "enc_pred_logits")
    assert_close(fx, "eval", out.encoder_proposals.boxes, fx.array("eval_enc_pred_boxes"), "enc_pred_boxes")


def test_parity_forced_decoder(eval_forced, fx):
    out, _ = eval_forced
    assert len(out.aux) == fx.cfg.decoder.num_layers - 1
    assert_close(fx, "eval", torch.stack(out.reference_boxes), fx.array("eval_dec_ref_boxes"), "dec_ref_boxes")
    all_boxes = torch.stack([p.boxes for p in out.aux] + [out.main.boxes])
    assert_close(fx, "eval", all_boxes, fx.array("eval_all_layer_pred_boxes"), "all_layer_pred_boxes")
    last_aux = f"aux{len(out.aux) - 1}"  # the fixture records the last auxiliary output (aux4 of 6 layers)
    assert_close(fx, "eval", out.aux[-1].logits, fx.array(f"eval_{last_aux}_pred_logits"), f"{last_aux}_pred_logits")
    assert_close(fx, "eval", out.aux[-1].boxes, fx.array(f"eval_{last_aux}_pred_boxes"), f"{last_aux}_pred_boxes")
    assert_close(fx, "eval", out.main.logits, fx.array("eval_pred_logits"), "pred_logits")
    assert_close(fx, "eval", out.main.boxes, fx.array("eval_pred_boxes"), "pred_boxes")


def _compare_detections(fx, det, i: int, flat: np.ndarray, order: list[int]) -> None:
    assert_close(fx, "eval", det.scores[order], fx.array(f"eval_det{i}_scores"), f"det{i}_scores",
                 f"det{i}_scores__common")
    assert_close(fx, "eval", det.boxes[order], fx.array(f"eval_det{i}_boxes"), f"det{i}_boxes",
                 f"det{i}_boxes__common")
    np.testing.assert_array_equal(det.labels[order].numpy(), fx.array(f"eval_det{i}_labels"))


def test_parity_forced_postprocessing(model, eval_forced, fx):
    """Detections over the forced decoder outputs: the free top-k as a set keyed by flat index
    (query x classes + class), and with the recorded top-k forced, position by position."""
    out, _ = eval_forced
    free = model.postprocess(out)
    forced = model.postprocess(out, policy=RecordedPolicy(fx, "eval_"))
    assert len(free) == len(forced) == fx.batch_size
    for i in range(fx.batch_size):
        official_flat = fx.array(f"eval_det{i}_flat_inds")
        flat = (free[i].query_indices * model.cfg.num_classes + free[i].labels).numpy()
        assert set(flat) == set(official_flat), f"image {i}: detection set differs"
        position = {f: j for j, f in enumerate(flat)}
        _compare_detections(fx, free[i], i, flat, [position[f] for f in official_flat])
        flat = (forced[i].query_indices * model.cfg.num_classes + forced[i].labels).numpy()
        np.testing.assert_array_equal(flat, official_flat, err_msg=f"image {i}: forced detection order")
        _compare_detections(fx, forced[i], i, flat, list(range(len(flat))))


# ---- training mode (real padding masks), decisions forced -----------------------------------------
@pytest.fixture(scope="module")
def train_forced(model, batch, fx):
    model.train()
    try:
        with torch.no_grad():
            out = model(batch, fx.targets(), policy=RecordedPolicy(fx, "train_"))
    finally:
        model.eval()
    return out


def test_parity_train_mode_forward(train_forced, fx):
    out = train_forced
    assert out.denoising is None  # load_fixture refuses fixtures recorded with denoising on
    assert_close(fx, "train", out.valid_ratios, fx.array("train_valid_ratios"), "valid_ratios")
    _exact(fx, out.token_padding_mask.numpy().astype(fx.array("train_token_padding_mask").dtype),
           "train_token_padding_mask")
    assert_close(fx, "train", out.foreground_logits[..., None], fx.array("train_fg_score"), "fg_score")
    _exact(fx, out.encoder_trace.token_counts, "train_focus_token_nums")
    for layer in range(fx.cfg.encoder.num_layers):
        _exact(fx, out.encoder_trace.oesm_indices[layer], f"train_oesm_token_ids_l{layer}")
    assert_close(fx, "train", out.memory.sum(-1), fx.array("train_memory_chsum"), "memory_chsum")
    assert_close(fx, "train", out.encoder_proposals.logits, fx.array("train_enc_pred_logits"), "enc_pred_logits")
    assert_close(fx, "train", out.encoder_proposals.boxes, fx.array("train_enc_pred_boxes"), "enc_pred_boxes")
    assert_close(fx, "train", out.main.logits, fx.array("train_pred_logits"), "pred_logits")
    assert_close(fx, "train", out.main.boxes, fx.array("train_pred_boxes"), "pred_boxes")


# ---- training losses (denoising off, as recorded) ---------------------------------------------------
@pytest.fixture(scope="module")
def train_losses(train_forced, fx):
    criterion = fx.criterion()
    with torch.no_grad():
        losses = criterion(train_forced, fx.targets())
    return criterion, criterion.weighted(losses)


def test_parity_train_losses_match_official(train_losses, fx):
    """Every key of the official (weighted) loss dict, from our model + criterion."""
    _, weighted = train_losses
    official = fx.require("train_losses_weighted")
    assert set(weighted) == set(official), set(weighted) ^ set(official)
    rtol = fx.loss_rtol()
    worst = 0.0
    for key, value in official.items():
        ours = float(weighted[key])
        rel = abs(ours - value) / abs(value) if value else abs(ours)
        worst = max(worst, rel)
        assert abs(ours - value) <= rtol * abs(value), f"{key}: ours {ours} vs official {value} (rtol {rtol:.3g})"
    record(fx, "train_loss_values (relative)", worst, rtol, fx.loss_noise())


def test_parity_train_matches_and_foreground_targets(train_forced, train_losses, fx):
    from focus_detr.losses import foreground_targets

    criterion, _ = train_losses
    fg = foreground_targets(train_forced.spatial_shapes, train_forced.image_sizes, fx.targets())
    _exact(fx, fg.numpy().astype(fx.array("train_fg_targets").dtype), "train_fg_targets")
    outputs = {"main": "main", "enc": "enc"} | {f"aux_{i}": f"aux{i}" for i in range(fx.cfg.decoder.num_layers - 1)}
    for ours_name, official_name in outputs.items():
        for b in range(fx.batch_size):
            q, g = criterion.last_indices[ours_name][b]
            official = fx.array(f"train_match_{official_name}_img{b}")
            assert sorted(zip(q.tolist(), g.tolist())) == sorted(zip(*official.tolist())), (official_name, b)


# ---- fixtures the tests cannot interpret fail, saying what is missing ------------------------------------
def _edited_copy(tmp_path, edit_manifest=None, edit_keys=None):
    """A copy of the first fixture with manifest.json / keys.json edited (the big files are linked)."""
    import json

    from parity_utils import fixture_dirs

    source = fixture_dirs()[0]
    folder = tmp_path / source.name
    folder.mkdir()
    for path in source.iterdir():
        if path.name not in ("manifest.json", "keys.json"):
            (folder / path.name).symlink_to(path.resolve())
    for name, edit in (("manifest.json", edit_manifest), ("keys.json", edit_keys)):
        data = json.loads((source / name).read_text())
        if edit is not None:
            edit(data)
        (folder / name).write_text(json.dumps(data))
    return folder


def _drop_noise(m):
    del m["calibration_max_abs_diff"]["float64_forced_vs_float32"]["pred_logits"]


def _unknown_override(m):
    m["config_overrides"]["model.transformer.mystery"] = 3


def _other_temperature(m):
    m["model_config_resolved_yaml"] = re.sub(r"(position_embedding:\n(?:  .*\n)*?  temperature: )\S+", r"\g<1>123",
                                             m["model_config_resolved_yaml"], count=1)


def _no_salt(m):
    del m["salt"]


def _rule_filled_integer(k):
    k["keys"][0]["dtype"] = "int64"
    k["keys"][0]["rule_filled"] = True


@pytest.mark.parametrize("edit_manifest,edit_keys,message", [
    (_drop_noise, None, "float64_forced_vs_float32 records no noise for 'pred_logits'"),
    (_unknown_override, None, "config_overrides 'model.transformer.mystery' has no counterpart"),
    (_other_temperature, None, "position_embedding.temperature = 123"),
    (_no_salt, None, "no field 'salt'"),
    (None, _rule_filled_integer, "is rule_filled but has the integer dtype"),
], ids=["missing_noise", "unknown_override", "preset_differs", "no_salt", "rule_filled_integer"])
def test_parity_utils_refuse_what_they_cannot_interpret(tmp_path, edit_manifest, edit_keys, message):
    from parity_utils import FixtureError

    folder = _edited_copy(tmp_path, edit_manifest, edit_keys)
    with pytest.raises(FixtureError, match=re.escape(message)):
        fx = load_fixture(folder)
        fx.atol("eval", "pred_logits")
        fx.official_state_dict(torch.nn.Module())


def test_parity_utils_take_fixtures_from_the_environment(tmp_path, monkeypatch):
    """Folders in FOCUS_DETR_PARITY_FIXTURE join the built-in ones, each under its own test id; a folder
    that does not exist is kept, so its tests fail saying so."""
    from parity_utils import FIXTURE_ENV, FixtureError, fixture_dirs

    built_in = fixture_dirs()
    folder = _edited_copy(tmp_path)
    missing = tmp_path / "nowhere" / "official_parity"
    monkeypatch.setenv(FIXTURE_ENV, os.pathsep.join([str(folder), str(missing), str(built_in[0])]))
    params = fixture_params()
    assert [p.values[0] for p in params] == built_in + [folder, missing]
    ids = [p.id for p in params]
    assert len(set(ids)) == len(ids) and all("official_parity" in i for i in ids)
    assert load_fixture(folder).preset == load_fixture(built_in[0]).preset
    with pytest.raises(FixtureError, match="does not exist"):
        load_fixture(missing)
