"""Unit tests of the model on the small ``tiny`` preset: token selection, denoising, encoder modes, batch
invariance, small inputs, save / load and official-checkpoint errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import focus_detr
from focus_detr.model.batching import OFFICIAL
from focus_detr.model.denoising import build_attention_mask, prepare_denoising
from focus_detr.model.encoder import plan_token_selection
from focus_detr.model.selection import STABLE_POLICY


def _images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return focus_detr.build_model("tiny").eval()


@pytest.fixture(scope="module")
def tiny_query_nms():
    """The demo's configuration, with large equal proposal boxes so that the distinct query selection acts."""
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny", **{"decoder.query_nms_iou": 0.5}).eval()
    with torch.no_grad():
        model.proposal_box_head.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, 3.0, 3.0]))
    return model


# ---- token selection ---------------------------------------------------------------------------------
def test_cascade_counts_per_image_and_padding_never_selected(tiny):
    sizes = [(96, 128), (64, 80), (40, 48)]
    batch = tiny.batch(_images(sizes))
    with torch.no_grad():
        out = tiny(batch)
    trace = out.encoder_trace
    valid = (~out.token_padding_mask).sum(1)
    expected_counts = (valid.float() * tiny.cfg.encoder.keep_ratio).int() + 1
    assert torch.equal(trace.token_counts, expected_counts)
    for layer, ratio in enumerate(tiny.cfg.encoder.cascade):
        per_image = (torch.tensor(ratio, dtype=torch.float32) * expected_counts.float()).int()
        assert torch.equal(trace.selected_valid[layer].sum(1), per_image.to(torch.long)), layer
        for b in range(len(sizes)):
            ids = trace.selected_indices[layer][b][trace.selected_valid[layer][b]]
            assert not out.token_padding_mask[b, ids].any(), "a padded token was selected"
            assert len(set(ids.tolist())) == len(ids)
            # Layer l's set is a prefix of the score ranking: nested in the previous layer's.
            if layer:
                prev = trace.selected_indices[layer - 1][b][trace.selected_valid[layer - 1][b]]
                assert set(ids.tolist()) <= set(prev.tolist())
        # OESM tokens are among the layer's own tokens.
        for b in range(len(sizes)):
            own = set(trace.selected_indices[layer][b][trace.selected_valid[layer][b]].tolist())
            m = min(tiny.cfg.encoder.oesm_topk, len(own))
            assert set(trace.oesm_indices[layer][b][:m].tolist()) <= own


def test_plan_token_selection_official_budget():
    scores = torch.randn(2, 1000)
    valid = torch.tensor([1000, 700])
    sel = plan_token_selection(scores, valid, 0.5, (1.0, 0.8, 0.2), batching=OFFICIAL, policy=STABLE_POLICY)
    assert sel.token_counts.tolist() == [501, 351]
    assert [i.shape[1] for i in sel.indices] == [501, 400, 100]
    # The smaller image writes back at most its own budget.
    assert sel.write_back[0].sum(1).tolist() == [501, 351]
    assert sel.write_back[1].sum(1).tolist() == [400, 351]


# ---- denoising ---------------------------------------------------------------------------------------
def test_denoising_layout_mask_and_noise_bounds():
    torch.manual_seed(1)
    embed = torch.nn.Embedding(5, 8)
    targets = [{"labels": torch.tensor([0, 1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.3, 0.3, 0.1, 0.1],
                                                                         [0.7, 0.6, 0.3, 0.2]])},
               {"labels": torch.tensor([4]), "boxes": torch.tensor([[0.4, 0.5, 0.4, 0.4]])}]
    dn = prepare_denoising(targets, 10, 0.5, 1.0, 5, embed, num_queries=7)
    assert dn.max_gt == 3 and dn.num_groups == 3  # 2*10 // (2*3)
    pad = 2 * dn.max_gt * dn.num_groups
    assert dn.content.shape == (2, pad, 8) and dn.boxes.shape == (2, pad, 4)
    mask = dn.attn_mask
    assert mask.shape == (pad + 7, pad + 7)
    assert mask[pad:, :pad].all() and not mask[pad:, pad:].any()  # queries never see denoising slots
    group = 2 * dn.max_gt
    for g in range(dn.num_groups):
        rows = slice(g * group, (g + 1) * group)
        assert not mask[rows, g * group:(g + 1) * group].any()  # a group sees itself
        assert not mask[rows, pad:].any()  # and the matching queries
        others = torch.ones(pad, dtype=torch.bool)
        others[g * group:(g + 1) * group] = False
        assert mask[rows][:, :pad][:, others].all()
    # Unused slots of image 1 (only one GT) are zero.
    for c in range(2 * dn.num_groups):
        assert dn.content[1, c * dn.max_gt + 1:(c + 1) * dn.max_gt].abs().sum() == 0
    # Noise bounds in xyxy: positives move at most half a side, negatives between a half and a full side.
    gt = targets[0]["boxes"]
    gt_xyxy = torch.cat([gt[:, :2] - gt[:, 2:] / 2, gt[:, :2] + gt[:, 2:] / 2], 1)
    half = torch.cat([gt[:, 2:] / 2, gt[:, 2:] / 2], 1)
    for c in range(2 * dn.num_groups):
        boxes = dn.boxes[0, c * dn.max_gt:c * dn.max_gt + 3].sigmoid()
        xyxy = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
        shift = (xyxy - gt_xyxy).abs()
        clamped = (xyxy <= 1e-3) | (xyxy >= 1 - 1e-3)
        if c % 2 == 0:
            assert (shift <= half + 1e-4).all()
        else:
            assert ((shift <= 2 * half + 1e-4) | clamped).all()


def test_denoising_off_without_targets():
    embed = torch.nn.Embedding(5, 8)
    assert prepare_denoising([{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}],
                             10, 0.5, 1.0, 5, embed, 7) is None
    assert build_attention_mask(1, 2, 3, torch.device("cpu")).shape == (5, 5)


# ---- encoder modes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["focus", "dense", "sparse"])
def test_encoder_modes_forward_backward(mode):
    torch.manual_seed(0)
    model = focus_detr.build_model("tiny", encoder_mode=mode, num_classes=3).train()
    batch = model.batch(_images([(96, 112), (80, 96)]))
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.2, 0.3, 0.1, 0.2]])},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.6, 0.4, 0.5, 0.3]])}]
    out = model(batch, targets)
    assert out.main.logits.shape == (2, model.cfg.decoder.num_queries, 3)
    assert (out.foreground_logits is None) == (mode == "dense")
    assert (len(out.encoder_trace.oesm_indices) > 0) == (mode == "focus")
    from focus_detr.losses import HungarianMatcher, SetCriterion

    criterion = SetCriterion(3, HungarianMatcher(), num_decoder_layers=model.cfg.decoder.num_layers)
    loss = criterion.total(criterion(out, targets))
    assert torch.isfinite(loss)
    loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == [], unused


# ---- batch invariance --------------------------------------------------------------------------------
def _keyed(det):
    return {(int(q), int(lab)): (float(sc), box) for q, lab, sc, box in
            zip(det.query_indices, det.labels, det.scores, det.boxes)}


@pytest.mark.parametrize("model_fixture", ["tiny", "tiny_query_nms"])
def test_detections_identical_alone_and_in_a_mixed_batch(model_fixture, request):
    """Same detections (keyed by query and class) with scores within 1e-5 and boxes within 1e-3 px. Keys may
    differ only at the top-k boundary, between scores closer than float noise."""
    tiny = request.getfixturevalue(model_fixture)
    sizes = [(120, 160), (72, 200), (96, 64), (40, 36)]
    images = _images(sizes, seed=3)
    with torch.no_grad():
        together = tiny.postprocess(tiny(tiny.batch(images)), max_detections=30)
        for img, det in zip(images, together):
            alone = tiny.postprocess(tiny(tiny.batch([img])), max_detections=30)[0]
            a, b = _keyed(alone), _keyed(det)
            for key in a.keys() & b.keys():
                assert abs(a[key][0] - b[key][0]) <= 1e-5
                torch.testing.assert_close(a[key][1], b[key][1], atol=1e-3, rtol=0)
            cutoff = float(alone.scores[-1])
            for key in a.keys() ^ b.keys():
                score = (a.get(key) or b.get(key))[0]
                assert abs(score - cutoff) <= 1e-5, f"{key} differs with score {score} (cut-off {cutoff})"
            assert len(a.keys() & b.keys()) >= len(a) - 2


@pytest.mark.parametrize("mode", ["focus", "sparse"])
@pytest.mark.parametrize("sizes", [[(120, 160)], [(120, 160), (72, 200)]])
def test_inference_path_writes_tokens_in_place_with_the_same_result(tiny, mode, sizes):
    """Without autograd the encoder writes each layer's tokens into one copy of the features (and skips the
    keep-old-values fallback when every slot is written back); with autograd it works out of place. Same
    memory either way, and the caller's features are untouched. Sparse mode samples the memory it writes."""
    model = focus_detr.build_model("tiny", encoder_mode=mode).eval()
    model.load_state_dict(tiny.state_dict(), strict=False)
    batch = model.batch(_images(sizes, seed=5))
    seen = {}

    def keep_features(module, args):
        seen["features"] = args[0]
        seen["before"] = args[0].clone()

    handle = model.encoder.register_forward_pre_hook(keep_features)
    try:
        with torch.no_grad():
            fast = model(batch)
        assert torch.equal(seen["features"], seen["before"])
        with torch.enable_grad():
            reference = model(batch)
    finally:
        handle.remove()
    torch.testing.assert_close(fast.memory, reference.memory.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.main.logits, reference.main.logits.detach(), atol=1e-4, rtol=1e-4)


def test_official_mode_is_batch_dependent_but_runs(tiny):
    model = focus_detr.build_model("tiny", batch_mode="official").eval()
    model.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        out = model(model.batch(_images([(120, 160), (64, 64)])))
    assert out.token_padding_mask.sum() == 0  # official eval: padding counts as image


# ---- small and odd inputs ----------------------------------------------------------------------------
def test_fewer_tokens_than_queries_and_oesm(tiny):
    # 24x24 px -> 9 + 4 + 1 + 1 tokens, fewer than the 50 queries and the 50 OESM tokens.
    with torch.no_grad():
        out = tiny(tiny.batch(_images([(24, 24)])))
    assert out.main.logits.shape[1] == int((~out.token_padding_mask).sum())
    with torch.no_grad():
        out = tiny(tiny.batch(_images([(24, 24), (160, 160)])))
    assert out.query_padding_mask is not None and out.query_padding_mask[0].sum() > 0
    dets = tiny.postprocess(out)
    assert len(dets[0]) <= int((~out.query_padding_mask[0]).sum()) * tiny.cfg.num_classes


@pytest.mark.parametrize("size", [(32, 32), (32, 2000), (2000, 48), (600, 400)])
def test_predict_any_size(tiny, tmp_path, size):
    h, w = size
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    det = tiny.predict(str(path), max_detections=20)
    assert det.boxes.shape == (len(det), 4) and det.boxes.dtype == torch.float32
    assert len(det) <= 20 and len(det.names) == len(det)
    if len(det):
        assert (det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= w).all()
        assert (det.boxes[:, 1] >= 0).all() and (det.boxes[:, 3] <= h).all()
        assert (det.boxes[:, 2] > det.boxes[:, 0]).all() and (det.boxes[:, 3] > det.boxes[:, 1]).all()
        assert torch.all(det.scores[:-1] >= det.scores[1:])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16"])
def test_predict_image_modes(tiny, mode):
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    dets = tiny.predict([img, np.asarray(rgb)], score_threshold=0.0, max_detections=5)
    assert len(dets) == 2 and all(len(d) <= 5 for d in dets)


# ---- presets, save / load, official checkpoint errors ------------------------------------------------
def test_presets_build():
    # R50's exact official count is checked in test_parity; R101's comes from the spec (section 12).
    r101 = focus_detr.build_model("r101_4scale")
    assert sum(p.numel() for p in r101.parameters()) == 68_279_824
    for name in focus_detr.PRESETS:
        assert focus_detr.get_preset(name).num_classes > 0
    with pytest.raises(KeyError, match="unknown preset"):
        focus_detr.build_model("r42")


def test_swin_tiny_preset_runs():
    model = focus_detr.build_model("swin_tiny_224_4scale", **{"decoder.num_queries": 30}).eval()
    with torch.no_grad():
        out = model(model.batch(_images([(96, 128)])))
    assert out.main.boxes.shape == (1, 30, 4)


def test_save_load_roundtrip(tiny, tmp_path):
    path = focus_detr.save(tiny, tmp_path / "tiny.pth")
    payload = torch.load(path, weights_only=True)  # plain content only
    assert payload["format"] == "focus-detr-weights"
    loaded = focus_detr.load(path)
    batch = tiny.batch(_images([(64, 96)]))
    with torch.no_grad():
        a, b = tiny(batch), loaded(batch)
    torch.testing.assert_close(a.main.logits, b.main.logits, rtol=0, atol=0)
    assert loaded.cfg == tiny.cfg


def test_load_rejects_truncated_and_foreign_files(tiny, tmp_path):
    path = focus_detr.save(tiny, tmp_path / "tiny.pth")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(focus_detr.CheckpointFormatError, match="cut.pth"):
        focus_detr.load(tmp_path / "cut.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(focus_detr.CheckpointFormatError, match="text.pth"):
        focus_detr.load(tmp_path / "text.pth")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "official.pth")
    with pytest.raises(focus_detr.CheckpointFormatError, match="load_official"):
        focus_detr.load(tmp_path / "official.pth")


def test_load_official_names_bad_keys(tiny):
    import json
    from pathlib import Path

    keys = json.loads((Path(__file__).resolve().parents[1] / "fixtures/official_parity/keys.json").read_text())
    sd = {e["key"]: torch.zeros(e["shape"]) for e in keys["keys"]}
    sd_missing = dict(sd)
    del sd_missing["transformer.level_embeds"]
    with pytest.raises(focus_detr.CheckpointMismatchError, match="level_embed"):
        focus_detr.load_official(sd_missing, "r50_4scale")
    sd_extra = dict(sd)
    sd_extra["transformer.mystery.weight"] = torch.zeros(3)
    with pytest.raises(focus_detr.CheckpointMismatchError, match="transformer.mystery.weight"):
        focus_detr.load_official(sd_extra, "r50_4scale")
    sd_shape = dict(sd)
    sd_shape["label_enc.weight"] = torch.zeros(91, 256)
    with pytest.raises(focus_detr.CheckpointMismatchError, match="dn_label_embed.weight"):
        focus_detr.load_official({"model": sd_shape}, "r50_4scale")
    with pytest.raises(focus_detr.CheckpointMismatchError, match="missing keys"):
        focus_detr.load_official(sd, "r101_4scale")


def test_forward_stages_are_profiler_ranges(tiny):
    """Every stage of a forward is a ``focus_detr.<stage>`` range in a profiler trace, in order, and
    bench's stage_hook sees the same stages without a profiler."""
    from torch.profiler import ProfilerActivity, profile

    from focus_detr.bench.flops import stage_hook
    from focus_detr.model.stages import STAGE_PREFIX, STAGES

    batch = tiny.batch(_images([(64, 80)]))
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        tiny(batch)
    ranges = sorted((ev.time_range.start, ev.name[len(STAGE_PREFIX):]) for ev in prof.events()
                    if ev.name.startswith(STAGE_PREFIX))
    assert [name for _, name in ranges] == list(STAGES)
    seen = []
    with torch.no_grad(), stage_hook(tiny, seen.append):
        tiny(batch)
    assert seen == list(STAGES) + ["end"]
