"""The inference-time keep-ratio knob (focus_detr.model.knobs) and `focus-detr predict --keep-ratio`."""

from __future__ import annotations

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cli_utils import cli_command
from focus_detr import build_model
from focus_detr.model.knobs import check_keep_ratio, with_keep_ratio


@pytest.fixture(scope="module")
def tiny_and_batch():
    torch.manual_seed(0)
    model = build_model("tiny").eval()
    g = torch.Generator().manual_seed(0)
    batch = model.batch([torch.randint(0, 256, (3, 96, 128), generator=g, dtype=torch.uint8)])
    return model, batch


def _layer_tokens(model, batch) -> tuple[list[int], int]:
    with torch.no_grad():
        out = model(batch)
    per_layer = [int(t.shape[1]) for t in out.encoder_trace.selected_indices]
    return per_layer, int((~out.token_padding_mask).sum())


@settings(max_examples=8, deadline=None)
@given(st.floats(min_value=0.01, max_value=1.0))
def test_keep_ratio_sets_the_token_budget_of_every_layer(tiny_and_batch, ratio):
    model, batch = tiny_and_batch
    saved = model.cfg
    try:
        with_keep_ratio(model, ratio)
        per_layer, valid = _layer_tokens(model, batch)
        # the budget is computed in float32 and truncated, as in the model and the official code
        budget = min(int(np.float32(valid) * np.float32(ratio)) + 1, valid)
        assert per_layer == [int(np.float32(c) * np.float32(budget)) for c in model.cfg.encoder.cascade]
    finally:
        model.cfg = saved
        model.encoder.cfg = saved.encoder


def test_same_ratio_same_outputs_and_weights_untouched(tiny_and_batch):
    model, batch = tiny_and_batch
    saved = model.cfg
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(batch).main.logits
    try:
        assert with_keep_ratio(model, 0.2) is model
        assert model.cfg.encoder.keep_ratio == 0.2 and model.encoder.cfg.keep_ratio == 0.2
        with torch.no_grad():
            low = model(batch).main.logits
        with_keep_ratio(model, saved.encoder.keep_ratio)
        with torch.no_grad():
            again = model(batch).main.logits
    finally:
        model.cfg = saved
        model.encoder.cfg = saved.encoder
    assert torch.equal(before, again)
    assert not torch.equal(before, low)  # fewer tokens updated: a different result
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_cascade_override(tiny_and_batch):
    model, batch = tiny_and_batch
    saved = model.cfg
    try:
        with_keep_ratio(model, 0.5, cascade=[1.0, 1.0])
        assert model.cfg.encoder.cascade == (1.0, 1.0)
        per_layer, _ = _layer_tokens(model, batch)
        assert per_layer[0] == per_layer[1]
    finally:
        model.cfg = saved
        model.encoder.cfg = saved.encoder


@pytest.mark.parametrize("ratio", [0, -0.1, 1.01, math.nan, math.inf, True, "0.5", None])
def test_bad_ratios_are_refused_in_one_line(ratio):
    with pytest.raises(ValueError, match="keep_ratio") as info:
        check_keep_ratio(ratio)
    assert "\n" not in str(info.value)


def test_bad_cascades_and_modes():
    with pytest.raises(ValueError, match="2 ratios but the encoder has 3 layers"):
        check_keep_ratio(0.5, (1.0, 0.5), num_layers=3)
    with pytest.raises(ValueError, match=r"cascade\[1\]"):
        check_keep_ratio(0.5, (1.0, 1.5), num_layers=2)
    with pytest.raises(ValueError, match="cascade must be a sequence"):
        check_keep_ratio(0.5, "1.0", num_layers=2)
    with pytest.raises(ValueError, match="sparse encoder has no cascade"):
        check_keep_ratio(0.5, (1.0, 1.0), num_layers=2, mode="sparse")
    dense = build_model("tiny", encoder_mode="dense")
    with pytest.raises(ValueError, match="dense"):
        with_keep_ratio(dense, 0.3)
    sparse = build_model("tiny", encoder_mode="sparse")
    assert with_keep_ratio(sparse, 0.3).cfg.encoder.keep_ratio == 0.3


def test_cli_predict_keep_ratio(tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)).save(img)
    base = [*cli_command(), "predict", "--preset", "tiny", "--random-init", str(img), "--no-draw", "--quiet",
            "--threads", "1"]
    bad = subprocess.run(base + ["--out", str(tmp_path / "bad"), "--keep-ratio", "1.5"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert "--keep-ratio" in bad.stderr and "(0, 1]" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run(base + ["--out", str(tmp_path / "ok"), "--keep-ratio", "0.3"], capture_output=True,
                          text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    info = json.loads((tmp_path / "ok" / "images.json").read_text())["info"]
    assert "keep ratio 0.3" in info["model"]


def test_keep_ratio_sweep_on_a_small_dataset(tmp_path):
    """The benchmark's knob sweep: AP and latency per keep ratio plus the dense reference, a table and a plot."""
    import focus_detr
    from focus_detr.bench.knob_sweep import format_sweep, keep_ratio_sweep, plot_sweep
    from focus_detr.data.synthetic import make_shapes_dataset

    make_shapes_dataset(tmp_path / "data", num_train=1, num_val=3, image_size=(64, 96))
    cats = json.loads((tmp_path / "data" / "annotations" / "instances_val.json").read_text())["categories"]
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=len(cats), class_names=tuple(c["name"] for c in cats),
                        test_short_side=64, test_max_size=96)
    weights = focus_detr.save(model, tmp_path / "w.pt")
    result = keep_ratio_sweep(str(weights), str(tmp_path / "data"), keep_ratios=(0.2, 0.5), latency_images=1,
                              repeats=1)
    configs = [p["config"] for p in result["points"]]
    assert configs == ["focus 0.2", "focus 0.5", "dense"]
    focus_low, focus_mid, dense = result["points"]
    assert focus_low["encoder_gflops"] < focus_mid["encoder_gflops"] < dense["encoder_gflops"]
    assert focus_low["tokens_fraction"] < focus_mid["tokens_fraction"] < dense["tokens_fraction"] == 1.0
    assert dense["latency_vs_dense"] == pytest.approx(1.0)
    for p in result["points"]:
        assert p["AP"] is not None and p["ms_per_image"] > 0
    assert result["trained_keep_ratio"] == 0.5
    assert "| focus 0.2 |" in "\n".join(format_sweep(result, markdown=True))
    pytest.importorskip("matplotlib")
    path = plot_sweep(result, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").stat().st_size > 5000 and path.endswith("sweep.png")
