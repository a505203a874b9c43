"""Explaining Focus-DETR's token sparsification: foreground scores, the kept-token cascade, OESM tokens.

The encoder works on one flat sequence of ``N = sum_l H_l * W_l`` tokens: the feature levels are
concatenated finest first (strides 8, 16, 32, 64) and each level is flattened row-major. These helpers
undo that flattening (pure numpy), and draw the maps at their true positions on the image: the token at
``(row, col)`` of a level with stride ``s`` covers the ``s x s`` cell ``[col*s, (col+1)*s) x [row*s,
(row+1)*s)`` of the padded network input ("canvas"). The canvas is cropped to the un-padded image, so
padding is never shown, and then stretched onto the picture that is displayed, which may have another
resolution than the network input (e.g. the original photo).

Inputs are plain tensors or arrays for one image, e.g. from :class:`~focus_detr.model.outputs.FocusDETROutputs`::

    explain_figure(
        image,
        outputs.foreground_logits[b],
        outputs.spatial_shapes,
        [t[b] for t in outputs.encoder_trace.selected_indices],
        [t[b] for t in outputs.encoder_trace.oesm_indices],
        detections=(boxes, scores, labels),
        image_size=outputs.image_sizes[b],
        canvas_size=images.tensor.shape[-2:],
    )

matplotlib is imported lazily (it is an optional dependency); figures are drawn by Agg without
pyplot, so nothing here needs a display or touches the caller's backend.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from focus_detr.viz.draw import text_color, class_color, to_pil_rgb

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

# Colours of the feature levels in the token panels (finest first). Bright hues that stay distinct on a
# darkened photo and from each other when the fine cells are drawn over the coarse ones.
LEVEL_COLORS: tuple[str, ...] = ("#ffe135", "#2ee6d6", "#ff3ea5", "#3d7dff", "#ff8c1a", "#bfbfbf")
# Sequential colour map for the foreground probability (perceptually uniform, readable in grayscale).
SCORE_CMAP = "inferno"


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor / array / sequence -> numpy (torch is never imported here)."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _shapes(spatial_shapes: Any) -> list[tuple[int, int]]:
    """``[L, 2]`` ``(H_l, W_l)`` -> list of int pairs, validated."""
    arr = _to_numpy(spatial_shapes).astype(np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2 or (arr <= 0).any():
        raise ValueError(f"spatial_shapes must be [L, 2] positive (H, W), got {arr.tolist()}")
    return [(int(h), int(w)) for h, w in arr]


def level_strides(num_levels: int, strides: Sequence[int] | None = None) -> list[int]:
    """Stride of each level: ``strides`` if given, else Focus-DETR's 8, 16, 32, 64, ... (doubling)."""
    if strides is not None:
        if len(strides) != num_levels:
            raise ValueError(f"{len(strides)} strides given for {num_levels} levels")
        return [int(s) for s in strides]
    return [8 * 2**level for level in range(num_levels)]


def level_starts(spatial_shapes: Any) -> np.ndarray:
    """``[L]`` offset of each level in the flat token sequence (exclusive cumsum of ``H_l * W_l``)."""
    sizes = [h * w for h, w in _shapes(spatial_shapes)]
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def split_levels(values: Any, spatial_shapes: Any) -> list[np.ndarray]:
    """Undo the flattening: ``[N, ...]`` per-token values -> per level ``[H_l, W_l, ...]`` arrays.

    values:         ``[N]`` (or ``[N, ...]``) with ``N = sum_l H_l * W_l``, levels finest first, row-major.
    spatial_shapes: ``[L, 2]`` ``(H_l, W_l)``.
    """
    arr = _to_numpy(values)
    shapes = _shapes(spatial_shapes)
    total = sum(h * w for h, w in shapes)
    if arr.shape[0] != total:
        raise ValueError(f"got {arr.shape[0]} tokens but the spatial shapes {shapes} hold {total}")
    out, start = [], 0
    for h, w in shapes:
        out.append(arr[start : start + h * w].reshape(h, w, *arr.shape[1:]))
        start += h * w
    return out


def token_positions(indices: Any, spatial_shapes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat token ids ``[K]`` -> ``(level, row, col)``, each ``[K]`` int64."""
    idx = _to_numpy(indices).astype(np.int64).reshape(-1)
    shapes = _shapes(spatial_shapes)
    total = sum(h * w for h, w in shapes)
    if idx.size and (idx.min() < 0 or idx.max() >= total):
        raise ValueError(f"token ids must lie in [0, {total}), got range [{idx.min()}, {idx.max()}]")
    starts = level_starts(spatial_shapes)
    level = np.searchsorted(starts, idx, side="right") - 1
    widths = np.array([w for _, w in shapes], dtype=np.int64)
    local = idx - starts[level]
    return level, local // widths[level], local % widths[level]


def token_mask(indices: Any, spatial_shapes: Any, valid: Any | None = None) -> list[np.ndarray]:
    """Flat token ids -> one bool map ``[H_l, W_l]`` per level, True where a token is listed.

    indices: ``[K]`` token ids (e.g. one layer of ``EncoderTrace.selected_indices`` for one image).
    valid:   optional ``[K]`` bool; False slots are ignored (``EncoderTrace.selected_valid``: padding slots
             of a smaller image in a batch).
    """
    idx = _to_numpy(indices).astype(np.int64).reshape(-1)
    if valid is not None:
        keep = _to_numpy(valid).astype(bool).reshape(-1)
        if keep.shape != idx.shape:
            raise ValueError(f"valid has {keep.size} entries for {idx.size} indices")
        idx = idx[keep]
    flat = np.zeros(sum(h * w for h, w in _shapes(spatial_shapes)), dtype=bool)
    if idx.size:
        token_positions(idx, spatial_shapes)  # range check with a clear message
        flat[idx] = True
    return split_levels(flat, spatial_shapes)


def valid_token_maps(
    spatial_shapes: Any, image_size: Sequence[int] | Any, canvas_size: Sequence[int] | Any
) -> list[np.ndarray]:
    """Per level ``[H_l, W_l]`` bool, True on tokens inside the un-padded image.

    Same rule as the model's level masks: nearest-neighbour ``F.interpolate`` of the ``(H, W)`` canvas
    padding mask to ``(H_l, W_l)``, i.e. token row ``r`` reads canvas row ``floor(r * H / H_l)``.
    """
    h, w = (int(v) for v in _to_numpy(image_size).reshape(-1)[:2])
    canvas_h, canvas_w = (int(v) for v in _to_numpy(canvas_size).reshape(-1)[:2])
    maps = []
    for level_h, level_w in _shapes(spatial_shapes):
        rows = np.minimum(np.floor(np.arange(level_h) * (canvas_h / level_h)), canvas_h - 1) < h
        cols = np.minimum(np.floor(np.arange(level_w) * (canvas_w / level_w)), canvas_w - 1) < w
        maps.append(rows[:, None] & cols[None, :])
    return maps


def finest_level_map(level_masks: Sequence[np.ndarray], strides: Sequence[int]) -> tuple[np.ndarray, int]:
    """Merge per-level token masks into one map: the finest level with a True token covering each place.

    level_masks: per level ``[H_l, W_l]`` bool (finest first), e.g. from :func:`token_mask`.
    strides:     stride of each level, in canvas pixels.
    Returns ``(levels, cell)``: ``levels`` is ``[R, C]`` int on a grid of ``cell x cell`` canvas pixels
    (``cell`` = gcd of the strides, i.e. the finest stride), ``-1`` where no level kept a token.
    """
    cell = int(np.gcd.reduce(np.asarray(strides, dtype=np.int64)))
    # Every level covers the whole canvas (sizes are rounded up), so the tightest one bounds the grid;
    # what coarser levels reach beyond it is padding.
    rows = min(m.shape[0] * s for m, s in zip(level_masks, strides)) // cell
    cols = min(m.shape[1] * s for m, s in zip(level_masks, strides)) // cell
    out = np.full((rows, cols), -1, dtype=np.int64)
    # Coarse to fine, so that a finer level overwrites the coarser ones where both kept a token.
    for level in reversed(range(len(level_masks))):
        mask, s = level_masks[level], int(strides[level])
        r = np.arange(rows) * cell // s  # token row of this level covering each grid row
        c = np.arange(cols) * cell // s
        inside = (r < mask.shape[0])[:, None] & (c < mask.shape[1])[None, :]
        hit = np.zeros((rows, cols), dtype=bool)
        hit[inside] = mask[np.minimum(r, mask.shape[0] - 1)[:, None], np.minimum(c, mask.shape[1] - 1)[None, :]][inside]
        out[hit] = level
    return out, cell


def _sizes(
    spatial_shapes: Any, strides: list[int], image_size: Any | None, canvas_size: Any | None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(image_size, canvas_size)`` as int pairs; a missing canvas is the finest level times its stride."""
    shapes = _shapes(spatial_shapes)
    if canvas_size is None:
        canvas = (shapes[0][0] * strides[0], shapes[0][1] * strides[0])
    else:
        canvas = tuple(int(v) for v in _to_numpy(canvas_size).reshape(-1)[:2])
    img = canvas if image_size is None else tuple(int(v) for v in _to_numpy(image_size).reshape(-1)[:2])
    return img, canvas  # type: ignore[return-value]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # Written with exp(-|x|) so large logits (e.g. +inf/-inf masks) never overflow.
    x = x.astype(np.float64)
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def explain_arrays(
    foreground_logits: Any | None,
    spatial_shapes: Any,
    selected_indices: Sequence[Any] = (),
    oesm_indices: Sequence[Any] = (),
    image_size: Sequence[int] | Any | None = None,
    canvas_size: Sequence[int] | Any | None = None,
    selected_valid: Sequence[Any] | None = None,
    strides: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The figure's data as a flat dict of numpy arrays (``np.savez(path, **d)`` works on it).

    Keys (``l`` = feature level, finest first; ``k`` = encoder layer, 0-based like ``EncoderTrace``):
      ``foreground_prob_level{l}``  ``[H_l, W_l]`` float, sigmoid of the foreground logits (absent when
                                    ``foreground_logits`` is None, i.e. dense mode);
      ``valid_level{l}``            ``[H_l, W_l]`` bool, token inside the un-padded image;
      ``selected_layer{k}_level{l}`` ``[H_l, W_l]`` bool, token updated by encoder layer ``k``;
      ``oesm_layer{k}_level{l}``    ``[H_l, W_l]`` bool, token in layer ``k``'s object self-attention;
      ``selected_count``            ``[num_layers]`` int, kept tokens per layer;
      ``selected_inside_count``     ``[num_layers]`` int, kept tokens inside the image (dense mode also
                                    "keeps" the padding tokens, so this is what a percentage should use);
      ``valid_count``               ``[]`` int, tokens inside the image.
    ``image_size`` / ``canvas_size`` / ``strides``: as in :func:`explain_figure`.
    """
    shapes = _shapes(spatial_shapes)
    strides = level_strides(len(shapes), strides)
    (h, w), canvas = _sizes(spatial_shapes, strides, image_size, canvas_size)
    out: dict[str, np.ndarray] = {}
    valid = valid_token_maps(spatial_shapes, (h, w), canvas)
    for level, m in enumerate(valid):
        out[f"valid_level{level}"] = m
    if foreground_logits is not None:
        probs = _sigmoid(_to_numpy(foreground_logits).reshape(-1))
        for level, m in enumerate(split_levels(probs, spatial_shapes)):
            out[f"foreground_prob_level{level}"] = m
    counts, inside = [], []
    for k, idx in enumerate(selected_indices):
        slot_valid = None if selected_valid is None else selected_valid[k]
        masks = token_mask(idx, spatial_shapes, slot_valid)
        counts.append(int(sum(m.sum() for m in masks)))
        inside.append(int(sum((m & v).sum() for m, v in zip(masks, valid))))
        for level, m in enumerate(masks):
            out[f"selected_layer{k}_level{level}"] = m
    for k, idx in enumerate(oesm_indices):
        for level, m in enumerate(token_mask(idx, spatial_shapes)):
            out[f"oesm_layer{k}_level{level}"] = m
    out["selected_count"] = np.asarray(counts, dtype=np.int64)
    out["selected_inside_count"] = np.asarray(inside, dtype=np.int64)
    out["valid_count"] = np.asarray(int(sum(m.sum() for m in valid)), dtype=np.int64)
    return out


def kept_share_map(level_masks: Sequence[np.ndarray], valid_masks: Sequence[np.ndarray],
                   strides: Sequence[int]) -> tuple[np.ndarray, int]:
    """Per place, the share of its tokens that are kept, counting every token once (fine levels weigh more).

    level_masks: per level ``[H_l, W_l]`` bool (finest first), True on kept tokens.
    valid_masks: per level ``[H_l, W_l]`` bool, True on tokens inside the image (:func:`valid_token_maps`).
    strides:     stride of each level in canvas pixels.
    Returns ``(share, cell)``: ``share`` is ``[R, C]`` float in ``[0, 1]`` on a grid of ``cell x cell`` canvas
    pixels (``cell`` = the finest stride), NaN where no valid token covers the place.

    A level-``l`` token covers ``(s_l / cell)^2`` grid cells, so it adds ``(cell / s_l)^2`` to each: summed
    over the grid, the numerator counts the kept tokens and the denominator the valid ones. The map's mean
    over the image is therefore the layer's share of kept tokens -- a layer keeping 30 % of its tokens
    looks 30 % covered, however many coarse tokens it keeps (the "finest level" colouring of
    :func:`finest_level_map` paints a whole coarse cell for one kept token and overstates coverage).
    """
    cell = int(np.gcd.reduce(np.asarray(strides, dtype=np.int64)))
    rows = min(m.shape[0] * s for m, s in zip(level_masks, strides)) // cell
    cols = min(m.shape[1] * s for m, s in zip(level_masks, strides)) // cell
    kept = np.zeros((rows, cols), dtype=np.float64)
    total = np.zeros((rows, cols), dtype=np.float64)
    for mask, valid, s in zip(level_masks, valid_masks, strides):
        weight = (cell / float(s)) ** 2
        r = np.minimum(np.arange(rows) * cell // int(s), mask.shape[0] - 1)
        c = np.minimum(np.arange(cols) * cell // int(s), mask.shape[1] - 1)
        v = valid[r[:, None], c[None, :]]
        kept += weight * (mask[r[:, None], c[None, :]] & v)
        total += weight * v
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, kept / np.maximum(total, 1e-12), np.nan)
    return share, cell


def new_figure(figsize: tuple[float, float]) -> "Figure":
    """A matplotlib figure drawn by Agg, made without pyplot.

    Going around pyplot means no display is ever needed, the caller's backend (e.g. a notebook's) is
    left alone, and figures are not kept alive by pyplot's registry when explaining many images.
    Axes are placed by hand (in inches, see :func:`explain_figure`), so no layout engine is involved and
    extreme aspect ratios cannot make one give up with a warning.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


# Layout constants of the explain figure, in inches.
_GAP = 0.15  # between panels and around the figure
_PANEL_TITLE = 0.3  # above each panel
_MIN_PANEL_H = 1.1  # panels of very wide pictures get fewer per line instead of getting flatter
_MAX_PANEL_H = 4.5  # very tall pictures: narrower panels instead of taller ones
_MIN_CELL_W = 1.6  # a narrow panel still gets this much width, so that titles never run into each other
_CAPTION_FONT = 9.5
_KEPT_COLOR = "#ffd21f"  # kept-token share: one bright hue whose opacity is the share


@dataclass
class _Panel:
    kind: str  # "image", "levels", "summary", "layers", "oesm"
    title: str
    width: float
    height: float
    draw: Any  # callable(ax)


def explain_figure(
    image: Image.Image | np.ndarray | Any,
    foreground_logits: Any | None,
    spatial_shapes: Any,
    selected_indices: Sequence[Any] = (),
    oesm_indices: Sequence[Any] = (),
    detections: tuple[Any, Any, Any] | None = None,
    class_names: Sequence[str] | None = None,
    image_size: Sequence[int] | Any | None = None,
    canvas_size: Sequence[int] | Any | None = None,
    selected_valid: Sequence[Any] | None = None,
    strides: Sequence[int] | None = None,
    score_threshold: float = 0.3,
    max_detections: int = 50,
    title: str | None = None,
    width_inches: float = 16.0,
) -> "Figure":
    """One figure explaining where Focus-DETR looks, for one image.

    image:             the picture to draw on (any size: the network input or the original photo).
    foreground_logits: ``[N]`` raw foreground logits, or None (dense mode: no foreground panels).
    spatial_shapes:    ``[L, 2]`` ``(H_l, W_l)`` of the feature levels, finest first.
    selected_indices:  per encoder layer, ``[K_k]`` token ids updated by that layer.
    oesm_indices:      per encoder layer, ``[M]`` token ids of the object self-attention; empty -> no row 3.
    detections:        ``(boxes [D, 4] xyxy in pixels of image, scores [D], labels [D])`` or None.
    image_size:        ``(h, w)`` of the network input before padding; default: the canvas.
    canvas_size:       ``(H, W)`` of the padded network input; default: finest level size times stride.
    selected_valid:    per layer ``[K_k]`` bool, False on padding slots (``EncoderTrace.selected_valid``).
    strides:           stride of each level; default 8, 16, 32, 64.
    score_threshold / max_detections: which detections are drawn (most confident first).

    Rows, each with a caption in plain words: (1) the detections and, per feature-map resolution, the
    foreground score of every place (shared colour bar); (2) per encoder layer, the share of each place's
    tokens that the layer updates (opacity = share, so the coloured area matches the percentage in the
    title), and a chart of the share kept per resolution; (3) per layer, one dot per token of the
    object-enhanced self-attention, coloured by resolution. Only panels with content are made: a 2-layer
    model gets 2 panels per layer row. Panels keep the picture's aspect ratio; very wide pictures get fewer
    panels per line (rows wrap), very tall ones narrower panels. Percentages are of the tokens inside the
    un-padded image; layers are numbered from 1. ``fig.focus_detr_panels`` counts the panels of each kind
    (``{"image", "levels", "summary", "layers", "oesm"}``); each panel's axes has the label
    ``"panel:<kind>"``.
    """
    import textwrap

    from matplotlib.lines import Line2D

    shapes = _shapes(spatial_shapes)
    num_levels = len(shapes)
    level_s = level_strides(num_levels, strides)
    (img_h, img_w), canvas = _sizes(spatial_shapes, level_s, image_size, canvas_size)
    data = explain_arrays(
        foreground_logits, spatial_shapes, selected_indices, oesm_indices,
        image_size=(img_h, img_w), canvas_size=canvas, selected_valid=selected_valid, strides=level_s,
    )  # fmt: skip

    pil = to_pil_rgb(image)
    # Large photos are shrunk once here: panels are a few hundred pixels wide, and smaller rasters keep
    # both drawing and the saved file light. Coordinates below stay in pixels of the *original* picture.
    disp_w, disp_h = pil.size
    shrink = min(1.0, 900.0 / max(disp_w, disp_h))
    if shrink < 1.0:
        pil = pil.resize((max(1, round(disp_w * shrink)), max(1, round(disp_h * shrink))), Image.BILINEAR)
    rgb = np.asarray(pil, dtype=np.float32) / 255.0
    gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    dimmed = np.repeat((0.15 + 0.35 * gray)[..., None], 3, axis=2)  # dark gray photo: colours pop on it
    # Network-input pixels -> displayed-picture pixels (the picture shows exactly the un-padded input).
    sx, sy = disp_w / img_w, disp_h / img_h
    extent_img = (0.0, float(disp_w), float(disp_h), 0.0)
    n_layers, n_oesm = len(selected_indices), len(oesm_indices)
    has_scores = foreground_logits is not None
    valid_total = max(int(data["valid_count"]), 1)
    valid_maps = [data[f"valid_level{level}"] for level in range(num_levels)]

    # ---- panel size: keep the picture's aspect ratio, wrap lines for panoramas --------------------------
    aspect = disp_w / disp_h
    per_row = max(1 + (num_levels if has_scores else 0), n_layers + (1 if n_layers else 0), n_oesm, 1)
    usable = width_inches - _GAP
    cols = per_row
    panel_w = usable / cols - _GAP
    if panel_w / aspect < _MIN_PANEL_H:
        cols = max(1, min(per_row, int(usable // (_MIN_PANEL_H * aspect + _GAP))))
        panel_w = usable / cols - _GAP
    panel_h = panel_w / aspect
    if panel_h > _MAX_PANEL_H:
        panel_h = _MAX_PANEL_H
        panel_w = panel_h * aspect
    pt_per_px = panel_w * 72.0 / disp_w  # typographic points per displayed pixel

    def level_name(level: int) -> str:
        return f"{level_s[level]}-px cells"

    def show_image(ax, picture, cmap=None) -> None:
        ax.imshow(picture, extent=extent_img, interpolation="bilinear", cmap=cmap, vmin=0, vmax=1)

    def cell_extent(level: int) -> tuple[float, float, float, float]:
        # A level-l token (row, col) covers [col*s, (col+1)*s) x [row*s, (row+1)*s) canvas pixels.
        h_l, w_l = shapes[level]
        s = level_s[level]
        return (0.0, w_l * s * sx, h_l * s * sy, 0.0)

    # ---- the panels of each row ---------------------------------------------------------------------------
    sections: list[tuple[str, list[_Panel], str | None]] = []  # (caption, panels, footer kind)
    drawn = _drawable_detections(detections, score_threshold, max_detections) if detections is not None else None

    def draw_detections_panel(ax) -> None:
        show_image(ax, rgb)
        if drawn is None:
            return
        unlabelled = _draw_detection_patches(ax, drawn, class_names, pt_per_px, disp_w, disp_h)
        if not len(drawn[0]):
            ax.text(0.5, 0.5, f"no detections with\nscore \u2265 {score_threshold:.2f}", transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="black",
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 3})
        elif unlabelled:
            ax.text(0.01, 0.01, f"{unlabelled} not labelled", transform=ax.transAxes,
                    ha="left", va="bottom", fontsize=6.5, bbox={"facecolor": "white", "edgecolor": "none",
                                                               "alpha": 0.8, "pad": 1.5})

    found = "image"
    if drawn is not None:
        n = len(drawn[0])
        found = f"{n} detection{'s' if n != 1 else ''} (score \u2265 {score_threshold:.2f})"
    row1 = [_Panel("image", found, panel_w, panel_h, draw_detections_panel)]
    score_images: list[Any] = []
    if has_scores:
        for level in range(num_levels):
            def draw_level(ax, level=level) -> None:
                show_image(ax, gray, cmap="gray")  # gray photo under a colour map: colour only means "score"
                score_images.append(ax.imshow(data[f"foreground_prob_level{level}"], cmap=SCORE_CMAP, vmin=0.0,
                                              vmax=1.0, alpha=0.7, extent=cell_extent(level), interpolation="nearest"))
            h_l, w_l = shapes[level]
            row1.append(_Panel("levels", f"object score, {level_name(level)} ({h_l}\u00d7{w_l})", panel_w, panel_h,
                               draw_level))
    caption1 = ("1. What the model found" + (f": boxes with a score of at least {score_threshold:.2f}" if drawn is not None
                                              else ""))
    if has_scores:
        caption1 += (". Then, for each resolution of the feature maps, how likely the model thinks each place is "
                     "part of an object (its 'foreground score'). Focus-DETR uses this score to decide where to "
                     "spend computation.")
    sections.append((caption1, row1, "scores" if has_scores else None))

    if n_layers:
        row2 = []
        for k in range(n_layers):
            def draw_kept(ax, k=k) -> None:
                show_image(ax, dimmed)
                share, cell = kept_share_map([data[f"selected_layer{k}_level{level}"] for level in range(num_levels)],
                                             valid_maps, level_s)
                rgba = np.zeros((*share.shape, 4), dtype=np.float32)
                rgba[..., :3] = _hex_to_rgb(_KEPT_COLOR)
                rgba[..., 3] = 0.9 * np.nan_to_num(share)
                rows, cols_ = share.shape
                ax.imshow(rgba, extent=(0.0, cols_ * cell * sx, rows * cell * sy, 0.0), interpolation="nearest")
            count = int(data["selected_count"][k])
            share = 100.0 * int(data["selected_inside_count"][k]) / valid_total
            row2.append(_Panel("layers", f"layer {k + 1}: {count} tokens ({share:.1f}%)", panel_w, panel_h, draw_kept))
        chart_w = min(max(panel_w, 3.8), 5.0, usable - _GAP)  # room for the legend on its right
        row2.append(_Panel("summary", "share kept per resolution", chart_w, max(panel_h, 1.9),
                           lambda ax: _draw_summary(ax, data, num_levels, n_layers, level_s)))
        sections.append((
            "2. Where each encoder layer computes. Focus-DETR updates only the places it finds most likely to be "
            "objects and passes the others through unchanged. Yellow shows the share of a place's tokens that the "
            "layer updates (solid = all, faint = a few, none = dark), so the yellow area matches the percentage "
            "above each picture. The chart gives the share per resolution.", row2, None))
    if n_oesm:
        row3 = []
        for k in range(n_oesm):
            def draw_oesm(ax, k=k) -> None:
                show_image(ax, dimmed)
                _draw_token_dots(ax, [data[f"oesm_layer{k}_level{level}"] for level in range(num_levels)],
                                 level_s, sx, sy, pt_per_px)
            count = int(sum(data[f"oesm_layer{k}_level{level}"].sum() for level in range(num_levels)))
            row3.append(_Panel("oesm", f"layer {k + 1}: the {count} top-scoring tokens", panel_w, panel_h, draw_oesm))
        sections.append((
            "3. The places that also exchange information with each other as likely objects, one dot per token "
            "(the 'object-enhanced self-attention' of each encoder layer: its top-scoring tokens). Dot colour = "
            "feature-map resolution.", row3, "resolutions"))

    # ---- geometry: captions, wrapped lines of panels, footers (all in inches, top to bottom) ------------
    chars = max(20, int((width_inches - 2 * _GAP) * 72 / (_CAPTION_FONT * 0.58)))
    footer_h = {"scores": 0.6, "resolutions": 0.35, None: 0.0}
    layout = []  # per section: (caption lines, caption height, lines of panels, footer)
    height = _GAP + (0.4 if title else 0.0)
    for caption, panels, footer in sections:
        wrapped = textwrap.wrap(caption, chars)
        cap_h = 0.2 * len(wrapped) + 0.12
        lines: list[list[_Panel]] = [[]]
        for panel in panels:
            used = sum(_cell_width(q) + _GAP for q in lines[-1])
            if lines[-1] and used + _cell_width(panel) > usable + 1e-6:
                lines.append([])
            lines[-1].append(panel)
        body = sum(max(q.height for q in line) + _title_height(line) for line in lines)
        layout.append((wrapped, cap_h, lines, footer))
        height += cap_h + body + footer_h[footer] + _GAP
    fig = new_figure((width_inches, height))

    def rect(x: float, y: float, w: float, h: float) -> list[float]:
        """Inches from the top-left corner -> figure fraction rectangle."""
        return [x / width_inches, 1.0 - (y + h) / height, w / width_inches, h / height]

    y = _GAP
    if title:
        fig.text(0.5, 1.0 - (y + 0.15) / height, title, ha="center", va="center", fontsize=12, weight="bold")
        y += 0.4
    counts = {"image": 0, "levels": 0, "summary": 0, "layers": 0, "oesm": 0}
    for wrapped, cap_h, lines, footer in layout:
        fig.text(_GAP / width_inches, 1.0 - (y + 0.06) / height, "\n".join(wrapped), ha="left", va="top",
                 fontsize=_CAPTION_FONT, linespacing=1.25)
        y += cap_h
        level_axes = []
        for line in lines:
            line_w = sum(_cell_width(q) for q in line) + _GAP * (len(line) - 1)
            x = (width_inches - line_w) / 2  # short lines are centred, never padded with empty panels
            line_h = max(q.height for q in line)
            title_h = _title_height(line)
            for panel in line:
                cell_x = x
                x += (_cell_width(panel) - panel.width) / 2  # a narrow panel is centred in its cell
                y0 = y + title_h + (line_h - panel.height) / 2
                if panel.kind == "summary":  # room for the chart's tick labels inside its cell
                    ax = fig.add_axes(rect(x + 0.45, y0 + 0.02, panel.width - 1.45, panel.height - 0.42))
                else:
                    ax = fig.add_axes(rect(x, y0, panel.width, panel.height))
                    ax.set_xlim(0, disp_w)
                    ax.set_ylim(disp_h, 0)  # crops away the padded canvas: only the un-padded image is visible
                    ax.set_xticks([])
                    ax.set_yticks([])
                ax.set_label(f"panel:{panel.kind}")
                ax.set_title("\n".join(_wrap_title(panel)), fontsize=8)
                panel.draw(ax)
                counts[panel.kind] += 1
                if panel.kind == "levels":
                    level_axes.append((x, panel.width))
                x = cell_x + _cell_width(panel) + _GAP
            y += line_h + title_h
        if footer == "scores" and score_images:
            left = min(a for a, _ in level_axes)
            right = max(a + w for a, w in level_axes)
            bar_w = min(right - left, 4.0)
            cax = fig.add_axes(rect((left + right - bar_w) / 2, y + 0.12, bar_w, 0.12))
            bar = fig.colorbar(score_images[0], cax=cax, orientation="horizontal")
            bar.ax.tick_params(labelsize=7)
            bar.set_label("foreground score: 0 = background, 1 = surely part of an object", fontsize=8)
        elif footer == "resolutions":
            handles = [Line2D([], [], marker="o", linestyle="none", markersize=6, markerfacecolor=_level_color(level),
                              markeredgecolor="black", markeredgewidth=0.4, label=level_name(level))
                       for level in range(num_levels)]
            fig.legend(handles=handles, loc="center", ncols=num_levels, fontsize=8, frameon=False,
                       bbox_to_anchor=(0.5, 1.0 - (y + 0.17) / height), title=None)
        y += footer_h[footer] + _GAP
    fig.focus_detr_panels = counts  # type: ignore[attr-defined]
    return fig


def _cell_width(panel: _Panel) -> float:
    return max(panel.width, _MIN_CELL_W)


def _wrap_title(panel: _Panel) -> list[str]:
    import textwrap

    return textwrap.wrap(panel.title, max(12, int(_cell_width(panel) * 72 / (8 * 0.55)))) or [""]


def _title_height(line: Sequence[_Panel]) -> float:
    return _PANEL_TITLE + 0.14 * (max(len(_wrap_title(q)) for q in line) - 1)


def _level_color(level: int) -> str:
    return LEVEL_COLORS[level % len(LEVEL_COLORS)]


def _draw_token_dots(ax: Any, level_masks: Sequence[np.ndarray], strides: Sequence[int], sx: float, sy: float,
                     pt_per_px: float) -> None:
    """One dot per listed token at its cell's centre, coloured by level; coarse levels on top, so a fine
    token never hides one of the (fewer) coarse ones."""
    for level in reversed(range(len(level_masks))):
        rows, cols = np.nonzero(level_masks[level])
        if not rows.size:
            continue
        s = strides[level]
        # Dot diameter: the cell's width on screen, between 2.5 and 7 points.
        size = float(np.clip(s * sx * pt_per_px * 0.8, 3.5, 7.0)) ** 2
        ax.scatter((cols + 0.5) * s * sx, (rows + 0.5) * s * sy, s=size, c=_level_color(level), edgecolors="black",
                   linewidths=0.3, zorder=3)


def _hex_to_rgb(color: str) -> tuple[float, float, float]:
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def _drawable_detections(detections: tuple[Any, Any, Any], score_threshold: float,
                         max_detections: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The detections to draw: score >= threshold, most confident first, at most ``max_detections``."""
    boxes, scores, labels = (_to_numpy(v) for v in detections)
    boxes = boxes.astype(np.float64).reshape(-1, 4)
    scores = scores.astype(np.float64).reshape(-1)
    labels = labels.astype(np.int64).reshape(-1)
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold][:max_detections]
    return boxes[order], scores[order], labels[order]


def _draw_detection_patches(
    ax: Any,
    detections: tuple[np.ndarray, np.ndarray, np.ndarray],
    class_names: Sequence[str] | None,
    pt_per_px: float,
    width: float,
    height: float,
) -> int:
    """Boxes and tags in matplotlib, tags placed as :func:`focus_detr.viz.draw_detections` places them (no
    overlaps; a tag with no free place is left out). Returns how many boxes got no tag."""
    from matplotlib.patches import Rectangle

    from focus_detr.viz.draw import place_tags

    boxes, scores, labels = detections
    fontsize = 7.0
    px_per_pt = 1.0 / pt_per_px
    texts, sizes, clipped = [], [], []
    for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):  # most confident first get places
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        texts.append(f"{name} {score:.2f}")
        # Size estimate: 0.55 em per character plus padding, 1.5 em tall.
        sizes.append(((0.55 * len(texts[-1]) + 0.6) * fontsize * px_per_pt, 1.5 * fontsize * px_per_pt))
        clipped.append((min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width),
                        min(max(y1, 0), height)))
    spots = list(zip(texts, place_tags(clipped, sizes, width, height, max_width_share=0.8, max_height_share=0.3),
                     sizes))
    for k in reversed(range(len(scores))):  # least confident first, so the best ones are drawn on top
        x0, y0, x1, y1 = boxes[k]
        color = np.array(class_color(int(labels[k]))) / 255.0
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        text, spot, size = spots[k]
        if spot is None:
            continue
        ax.text(spot[0] + 0.3 * fontsize * px_per_pt, spot[1] + size[1] / 2, text, fontsize=fontsize, va="center",
                ha="left", clip_on=True, color=np.array(text_color(class_color(int(labels[k])))) / 255.0,
                bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.9})
    return sum(spot is None for _, spot, _ in spots)


def _draw_summary(ax, data: dict[str, np.ndarray], num_levels: int, n_layers: int, strides: list[int]) -> None:
    """Share of each level's (in-image) tokens kept by each layer: shows where the cascade prunes."""
    layers = np.arange(1, n_layers + 1)
    for level in range(num_levels):
        valid = data[f"valid_level{level}"]
        denom = max(int(valid.sum()), 1)
        share = [100.0 * (data[f"selected_layer{k}_level{level}"] & valid).sum() / denom for k in range(n_layers)]
        ax.plot(layers, share, marker="o", markersize=4, markeredgecolor="black", markeredgewidth=0.5, linewidth=1.8,
                color=_level_color(level), label=f"{strides[level]}-px cells")  # fmt: skip
    total = 100.0 * data["selected_inside_count"] / max(int(data["valid_count"]), 1)
    ax.plot(layers, total, color="black", linestyle="--", linewidth=1.2, label="all tokens")
    ax.set_xticks(layers)
    ax.set_xlabel("encoder layer", fontsize=7, labelpad=1)
    ax.set_ylabel("% of tokens updated", fontsize=7, labelpad=1)
    ax.set_ylim(0, 105)
    ax.tick_params(labelsize=6, pad=1)
    ax.grid(alpha=0.3)
    ax.set_facecolor("#e8e8e8")  # light gray: the pale level colours (yellow) stay visible
    ax.legend(fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.3)


def save_figure(fig: "Figure", path: str | os.PathLike[str], dpi: int = 150) -> None:
    """Save ``fig`` (PNG/PDF/SVG by extension) at ``dpi`` on a white background, creating the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
