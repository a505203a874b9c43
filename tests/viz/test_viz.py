"""Tests of focus_detr.viz: detection drawing, token-map geometry, explanation figure, report plots."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

try:
    import focus_detr  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from focus_detr.viz import (
    class_color,
    draw_detections,
    explain_arrays,
    explain_figure,
    finest_level_map,
    kept_share_map,
    plot_benchmark_bars,
    plot_loss_curve,
    save_figure,
    split_levels,
    token_mask,
    token_positions,
    valid_token_maps,
)
from focus_detr.viz.draw import text_color, place_tags
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("matplotlib")

# 4 levels of a 96x128 canvas (strides 8, 16, 32, 64 with ceil halving), image 80x120 inside it.
SHAPES = np.array([[12, 16], [6, 8], [3, 4], [2, 2]])
STARTS = [0, 192, 240, 252]
N = 256
CANVAS = (96, 128)
IMAGE_SIZE = (80, 120)


# ---------------------------------------------------------------------------------------------------
# draw_detections
# ---------------------------------------------------------------------------------------------------


def _as_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("background", [15, 240], ids=["dark", "light"])
@pytest.mark.parametrize("size", [(32, 32), (48, 64), (1500, 2000)], ids=["tiny", "small", "large"])
def test_draw_keeps_size_and_marks_box_edges(background: int, size: tuple[int, int]) -> None:
    h, w = size
    image = np.full((h, w, 3), background, dtype=np.uint8)
    before = image.copy()
    box = np.array([[0.25 * w, 0.4 * h, 0.75 * w, 0.9 * h]])
    out = draw_detections(image, torch.as_tensor(box), torch.tensor([0.87]), torch.tensor([3]), ["a", "b", "c", "cat"],
                          legend=False)
    assert out.size == (w, h) and out.mode == "RGB"
    assert np.array_equal(image, before), "the input must not be modified"
    arr = np.asarray(out)
    x0, y0, x1, y1 = box[0].astype(int)
    color = np.array(class_color(3))
    # The box's left and bottom edges are drawn in the class colour.
    assert np.array_equal(arr[(y0 + y1) // 2, x0], color)
    assert np.array_equal(arr[y1, (x0 + x1) // 2], color)
    # Far from the box and its tag, pixels are untouched.
    assert np.array_equal(arr[h - 1, w - 1], before[h - 1, w - 1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: Image.fromarray(np.full((40, 60), 128, np.uint8), mode="L"),
        lambda: Image.new("RGBA", (60, 40), (200, 200, 200, 255)),
        lambda: np.full((40, 60), 0.5, np.float32),  # grayscale float array in [0, 1]
        lambda: torch.full((3, 40, 60), 0.2),  # CHW tensor
        lambda: Image.new("P", (60, 40)),
    ],
    ids=["L", "RGBA", "gray-float", "chw-tensor", "P"],
)
def test_draw_converts_any_input_to_rgb(make) -> None:
    out = draw_detections(make(), np.array([[5.0, 5.0, 50.0, 35.0]]), np.array([0.5]), np.array([0]), None, legend=False)
    assert out.size == (60, 40) and out.mode == "RGB"
    assert np.array_equal(np.asarray(out)[20, 5], np.array(class_color(0)))


def test_draw_zero_detections_returns_unchanged_copy() -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    out = draw_detections(image, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), ["x"])
    assert out is not image and out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(image))
    # Everything below the threshold: also unchanged.
    out = draw_detections(image, [[1, 1, 30, 30]], [0.2], [0], ["x"], score_threshold=0.5)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_draw_tag_stays_inside_image() -> None:
    # A box touching the top edge: the tag goes inside the box, starting at the image's top-left corner.
    image = np.full((100, 100, 3), 255, np.uint8)
    out = np.asarray(draw_detections(image, [[0, 0, 99, 60]], [0.9], [0], ["person"]))
    assert np.array_equal(out[2, 8], np.array(class_color(0)))  # tag background inside the image
    # A box at the right edge: the tag is shifted left so that it ends inside the image.
    out = np.asarray(draw_detections(image, [[90, 50, 99, 99]], [0.9], [0], ["person"]))
    assert (out[:50, 60:90] != 255).any()


def _tag_rects(boxes, sizes, width, height):
    spots = place_tags(boxes, sizes, width, height)
    return [(x, y, x + w, y + h) for spot, (w, h) in zip(spots, sizes) if spot is not None for x, y in [spot]], spots


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 180), st.floats(0, 130), st.floats(5, 120), st.floats(5, 90)),
                min_size=1, max_size=30),
       st.integers(20, 60), st.integers(8, 14))
def test_placed_tags_never_overlap_and_stay_inside(raw, tag_w, tag_h) -> None:
    width, height = 240, 160
    boxes = [(x, y, min(x + w, width - 1), min(y + h, height - 1)) for x, y, w, h in raw]
    rects, _ = _tag_rects(boxes, [(tag_w, tag_h)] * len(boxes), width, height)
    for k, a in enumerate(rects):
        assert 0 <= a[0] and 0 <= a[1] and a[2] <= width and a[3] <= height
        for b in rects[k + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


def test_crowded_detections_get_distinct_tags_or_a_legend() -> None:
    # 12 identical boxes: at most a few tags fit around them; the others are listed in a legend strip.
    image = np.full((200, 300, 3), 128, np.uint8)
    boxes = [[100, 60, 200, 140]] * 12
    scores = np.linspace(0.95, 0.4, 12)
    out = draw_detections(image, boxes, scores, [k % 6 for k in range(12)], [f"class{k}" for k in range(6)])
    assert out.width == 300 and out.height > 200  # the legend strip below the picture
    legend = np.asarray(out)[200:]
    assert (legend != 255).any(axis=2).sum() > 200  # something is written there
    # Without the legend the size is kept.
    assert draw_detections(image, boxes, scores, [0] * 12, None, legend=False).size == (300, 200)


def test_tags_on_a_tiny_image_go_to_the_legend() -> None:
    # On 32x32 pixels a "cat 0.87" tag would cover the picture: it is written below it instead.
    image = np.full((32, 32, 3), 200, np.uint8)
    out = draw_detections(image, [[4, 4, 28, 28]], [0.87], [0], ["cat"])
    assert out.height > 32 and out.width >= 32
    picture = np.asarray(out)[:32, :32]
    changed = (picture != 200).any(axis=2).mean()
    assert changed < 0.45, f"{changed:.0%} of the tiny picture is covered"
    # A 600x400 picture keeps its size: the tag fits above the box.
    big = np.full((400, 600, 3), 200, np.uint8)
    assert draw_detections(big, [[100, 100, 300, 300]], [0.87], [0], ["cat"]).size == (600, 400)


def test_draw_detections_takes_a_detections_object() -> None:
    from focus_detr import Detections, draw_detections as top_level_draw

    det = Detections(torch.tensor([[5.0, 20.0, 60.0, 70.0], [30.0, 30.0, 90.0, 75.0]]), torch.tensor([0.9, 0.4]),
                     torch.tensor([1, 2]), ["dog", "cat"], torch.tensor([3, 7]))
    image = np.full((80, 120, 3), 90, np.uint8)
    by_object = np.asarray(top_level_draw(image, det))
    by_fields = np.asarray(draw_detections(image, det.boxes, det.scores, det.labels, ["bg", "dog", "cat"]))
    assert np.array_equal(by_object, by_fields)
    plotted = det.plot(image, score_threshold=0.5)  # only the dog
    assert plotted.size == (120, 80)
    assert np.array_equal(np.asarray(plotted), np.asarray(draw_detections(image, det.boxes[:1], det.scores[:1],
                                                                          det.labels[:1], ["bg", "dog"])))
    with pytest.raises(TypeError):
        draw_detections(image, det.boxes)


def test_text_color_contrasts_with_background() -> None:
    assert text_color((255, 225, 53)) == (0, 0, 0)  # yellow -> black text
    assert text_color((0, 0, 128)) == (255, 255, 255)  # navy -> white text
    assert text_color((255, 255, 255)) == (0, 0, 0)


def test_draw_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        draw_detections(np.zeros((10, 10, 3), np.uint8), [[0, 0, 5, 5]], [0.5, 0.6], [0], None)


# ---------------------------------------------------------------------------------------------------
# token geometry
# ---------------------------------------------------------------------------------------------------


def test_split_levels_round_trip() -> None:
    values = np.arange(N)
    maps = split_levels(torch.as_tensor(values), torch.as_tensor(SHAPES))
    assert [m.shape for m in maps] == [tuple(s) for s in SHAPES]
    for level, (h, w) in enumerate(SHAPES):
        for r in range(h):
            for c in range(w):
                assert maps[level][r, c] == STARTS[level] + r * w + c
    assert np.array_equal(np.concatenate([m.reshape(-1) for m in maps]), values)
    with pytest.raises(ValueError):
        split_levels(np.arange(N - 1), SHAPES)


def test_token_positions_hand_made() -> None:
    # (index, level, row, col), computed by hand from the 12x16, 6x8, 3x4, 2x2 levels.
    cases = [(0, 0, 0, 0), (15, 0, 0, 15), (16, 0, 1, 0), (191, 0, 11, 15), (192, 1, 0, 0), (201, 1, 1, 1),
             (240, 2, 0, 0), (251, 2, 2, 3), (252, 3, 0, 0), (255, 3, 1, 1)]  # fmt: skip
    level, row, col = token_positions([c[0] for c in cases], SHAPES)
    assert level.tolist() == [c[1] for c in cases]
    assert row.tolist() == [c[2] for c in cases]
    assert col.tolist() == [c[3] for c in cases]
    with pytest.raises(ValueError):
        token_positions([N], SHAPES)


def test_token_mask_marks_exactly_the_listed_tokens() -> None:
    indices = torch.tensor([201, 16, 255, 3, 240])
    valid = torch.tensor([True, True, True, False, True])  # slot 3 is padding of a smaller image
    masks = token_mask(indices, SHAPES, valid)
    expected = {(1, 1, 1), (0, 1, 0), (3, 1, 1), (2, 0, 0)}
    got = {(level, int(r), int(c)) for level, m in enumerate(masks) for r, c in zip(*np.nonzero(m))}
    assert got == expected
    assert sum(int(m.sum()) for m in token_mask([], SHAPES)) == 0


def test_valid_token_maps_follow_nearest_interpolation() -> None:
    maps = valid_token_maps(SHAPES, IMAGE_SIZE, CANVAS)
    # stride 8: rows with r*8 < 80 and cols with c*8 < 120 are inside the image.
    assert maps[0][:10, :15].all() and not maps[0][10:].any() and not maps[0][:, 15:].any()
    # stride 64 level is 2x2 on the 96x128 canvas: nearest source rows 0, 48 (< 80), cols 0, 64 (< 120).
    assert maps[3].all()
    # stride 16: rows r*16 < 80 -> r < 5; cols c*16 < 120 -> c < 8 (all).
    assert maps[1][:5].all() and not maps[1][5:].any()


def test_finest_level_map_prefers_fine_tokens() -> None:
    masks = [np.zeros((h, w), bool) for h, w in SHAPES]
    masks[3][0, 0] = True  # covers canvas [0, 64) x [0, 64) -> grid cells [0, 8) x [0, 8)
    masks[0][1, 2] = True  # one stride-8 cell inside it
    levels, cell = finest_level_map(masks, [8, 16, 32, 64])
    assert cell == 8 and levels.shape == (12, 16)
    assert (levels[:8, :8] >= 0).all()
    assert levels[1, 2] == 0 and levels[0, 0] == 3 and levels[7, 7] == 3
    assert levels[8, 8] == -1 and (levels[:, 8:] == -1).all()


# ---------------------------------------------------------------------------------------------------
# explanation figure
# ---------------------------------------------------------------------------------------------------


def _synthetic_trace(seed: int = 0):
    """Foreground logits and a focus-mode cascade (ratios of a 50% budget) over the synthetic levels."""
    rng = np.random.default_rng(seed)
    logits = torch.as_tensor(rng.normal(size=N), dtype=torch.float32)
    order = torch.argsort(logits, descending=True)
    k = int(0.5 * N) + 1
    selected = [order[: int(k * r)] for r in (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)]
    oesm = [order[:20] for _ in range(6)]
    return logits, selected, oesm


def test_explain_figure_panels_and_png(tmp_path: Path) -> None:
    logits, selected, oesm = _synthetic_trace()
    image = np.random.default_rng(1).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 70.0], [0.0, 0.0, 30.0, 20.0]])
    detections = (boxes, torch.tensor([0.9, 0.5]), torch.tensor([0, 2]))
    fig = explain_figure(
        image, logits, torch.as_tensor(SHAPES), selected, oesm, detections=detections, class_names=["a", "b", "c"],
        image_size=torch.tensor(IMAGE_SIZE), canvas_size=CANVAS, title="synthetic",
    )  # fmt: skip
    assert fig.focus_detr_panels == {"image": 1, "levels": 4, "summary": 1, "layers": 6, "oesm": 6}
    assert _panel_kinds(fig) == fig.focus_detr_panels
    titles = [ax.get_title() for ax in fig.get_axes()]
    assert sum(t.startswith("object score, 8-px cells") for t in titles) == 1
    assert sum("top-scoring tokens" in t for t in titles) == 6
    k = int(0.5 * N) + 1
    assert f"layer 1: {k} tokens" in " ".join(titles)
    path = tmp_path / "sub" / "explain.png"
    save_figure(fig, path)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width >= 2000  # 16 in at 150 dpi


def _panel_kinds(fig) -> dict[str, int]:
    kinds = [ax.get_label().split(":", 1)[1] for ax in fig.get_axes() if ax.get_label().startswith("panel:")]
    return {k: kinds.count(k) for k in ("image", "levels", "summary", "layers", "oesm")}


def _captions(fig) -> list[str]:
    return [t.get_text() for t in fig.texts if t.get_text()[:2] in ("1.", "2.", "3.")]


def test_explain_figure_two_layers_has_no_empty_panels_and_captions_in_plain_words() -> None:
    logits, selected, oesm = _synthetic_trace()
    fig = explain_figure(np.zeros((80, 120, 3), np.uint8), logits, SHAPES, selected[:2], oesm[:2],
                         detections=(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)),
                         image_size=IMAGE_SIZE, canvas_size=CANVAS)
    # Every axes is a panel with content (plus the colour bar): 1 + 4 levels + 2 layers + chart + 2 OESM.
    assert _panel_kinds(fig) == {"image": 1, "levels": 4, "summary": 1, "layers": 2, "oesm": 2}
    assert len(fig.get_axes()) == 10 + 1
    captions = _captions(fig)
    assert len(captions) == 3  # one per row
    text = " ".join(captions + [ax.get_title() for ax in fig.get_axes()])
    assert "OESM" not in text and "sigmoid" not in text and "logit" not in text
    # No detection above the threshold: the panel says so.
    notes = [t.get_text() for ax in fig.get_axes() for t in ax.texts]
    assert any("no detections with" in n and "0.30" in n for n in notes)


def test_explain_figure_panorama_keeps_its_shape_without_warnings() -> None:
    import warnings

    logits, selected, oesm = _synthetic_trace()
    panorama = np.random.default_rng(0).integers(0, 256, (120, 1600, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any matplotlib layout warning fails the test
        fig = explain_figure(panorama, logits, SHAPES, selected[:2], oesm[:2], image_size=IMAGE_SIZE,
                             canvas_size=CANVAS)
        fig.canvas.draw()
    width_in, height_in = fig.get_size_inches()
    for ax in fig.get_axes():
        box = ax.get_position()
        w, h = box.width * width_in, box.height * height_in
        kind = ax.get_label()
        if kind.startswith("panel:") and kind not in ("panel:summary",):
            assert w / h == pytest.approx(1600 / 120, rel=0.02)  # panels keep the picture's shape
            assert h >= 1.0  # ... and are not squashed flat
        elif not kind.startswith("panel:"):  # the colour bar
            assert h >= 0.1 and w >= 2.0


def test_explain_figure_tall_picture_titles_do_not_collide() -> None:
    logits, selected, oesm = _synthetic_trace()
    tall = np.zeros((1600, 120, 3), np.uint8)
    fig = explain_figure(tall, logits, SHAPES, selected[:2], oesm[:2], image_size=IMAGE_SIZE, canvas_size=CANVAS)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.get_axes() if ax.get_label().startswith("panel:")]
    for k, a in enumerate(boxes):
        for b in boxes[k + 1:]:
            assert not a.overlaps(b), "two panel titles overlap"


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.05, 0.95))
def test_kept_share_map_mean_is_the_share_of_kept_tokens(seed: int, ratio: float) -> None:
    # Coarse tokens must not make a sparse layer look covered: the map's mean is the token share.
    rng = np.random.default_rng(seed)
    shapes = [(16, 24), (8, 12), (4, 6), (2, 3)]  # an exact pyramid: every level covers the same canvas
    masks = [rng.random(s) < ratio for s in shapes]
    valid = [np.ones(s, bool) for s in shapes]
    share, cell = kept_share_map(masks, valid, [8, 16, 32, 64])
    assert cell == 8 and share.shape == (16, 24)
    kept = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
    assert share.mean() == pytest.approx(kept, abs=1e-9)
    # Only the coarsest level kept entirely: the map stays faint (1 token of 85 per place).
    only_coarse = [np.zeros(s, bool) for s in shapes[:3]] + [np.ones(shapes[3], bool)]
    faint, _ = kept_share_map(only_coarse, valid, [8, 16, 32, 64])
    assert faint.max() < 0.02


def test_explain_figure_dense_mode_omits_score_and_oesm_rows(tmp_path: Path) -> None:
    image = Image.new("RGB", (240, 160), (90, 120, 60))  # display larger than the network input
    fig = explain_figure(image, None, SHAPES, [np.arange(N)] * 6, [], image_size=IMAGE_SIZE, canvas_size=CANVAS)
    assert fig.focus_detr_panels == {"image": 1, "levels": 0, "summary": 1, "layers": 6, "oesm": 0}
    # Dense mode also "keeps" the padding tokens; the percentage is still of the in-image tokens.
    assert f"layer 6: {N} tokens (100.0%)" in [ax.get_title() for ax in fig.get_axes()]
    save_figure(fig, tmp_path / "dense.png")
    assert (tmp_path / "dense.png").stat().st_size > 0


def test_explain_arrays_contents() -> None:
    logits, selected, oesm = _synthetic_trace()
    arrays = explain_arrays(logits, SHAPES, selected, oesm, IMAGE_SIZE, CANVAS)
    for level, (h, w) in enumerate(SHAPES):
        prob = arrays[f"foreground_prob_level{level}"]
        assert prob.shape == (h, w) and ((prob > 0) & (prob < 1)).all()
        assert arrays[f"valid_level{level}"].dtype == bool
    np.testing.assert_allclose(
        np.concatenate([arrays[f"foreground_prob_level{level}"].reshape(-1) for level in range(4)]),
        torch.sigmoid(logits.double()).numpy(),
        rtol=1e-6,
    )
    assert arrays["selected_count"].tolist() == [len(s) for s in selected]
    assert (arrays["selected_inside_count"] <= arrays["selected_count"]).all()
    assert sum(int(arrays[f"oesm_layer5_level{level}"].sum()) for level in range(4)) == 20
    assert int(arrays["valid_count"]) == 10 * 15 + 5 * 8 + 3 * 4 + 2 * 2


# ---------------------------------------------------------------------------------------------------
# report plots
# ---------------------------------------------------------------------------------------------------


def test_plot_loss_curve_writes_png(tmp_path: Path) -> None:
    history = [
        {"iter": i, "loss": 30.0 / (1 + i / 50) + 5, "loss_class": torch.tensor(1.0 / (1 + i / 80)),
         "loss_bbox": 0.5, "loss_giou": 0.8, "loss_class_0": 1.2, "loss_class_dn": 0.9, "lr": 1e-4}
        for i in range(0, 500, 10)
    ]  # fmt: skip
    history.append({"iter": 500, "loss": float("nan")})  # a non-finite value is skipped, not fatal
    path = tmp_path / "loss.png"
    plot_loss_curve(history, path)
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_plot_benchmark_bars_writes_png(tmp_path: Path) -> None:
    rows = [{"mode": mode, "stage": stage, "ms": ms} for mode, f in (("dense", 1.0), ("focus", 0.5), ("sparse", 0.6))
            for stage, ms in (("backbone", 20.0), ("encoder", 60.0 * f), ("decoder", 15.0))]  # fmt: skip
    path = tmp_path / "bench.png"
    plot_benchmark_bars(rows, path)
    with Image.open(path) as png:
        assert png.format == "PNG"


def test_viz_imports_follow_the_layering() -> None:
    # viz may import ops and model.outputs only (never engine or the model builder), and matplotlib only
    # inside the plotting functions so that it stays an optional dependency.
    allowed = ("focus_detr.viz", "focus_detr.ops", "focus_detr.model.outputs")
    viz_dir = Path(__file__).resolve().parents[2] / "src" / "focus_detr" / "viz"
    for file in sorted(viz_dir.glob("*.py")):
        tree = ast.parse(file.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("focus_detr"):
                    assert name.startswith(allowed), f"{file.name} imports {name}"
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top_level:
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            assert not (module or "").startswith("matplotlib"), f"{file.name} imports matplotlib at module level"


def test_transparent_pixels_become_white() -> None:
    image = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    out = draw_detections(image, np.zeros((0, 4)), [], [], None)
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[5, 5], [255, 255, 255])
