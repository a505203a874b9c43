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
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from focus_detr.viz.draw import _text_color, class_color, to_pil_rgb

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


def _new_figure(figsize: tuple[float, float]) -> "Figure":
    """A matplotlib figure drawn by Agg, made without pyplot.

    Going around pyplot means no display is ever needed, the caller's backend (e.g. a notebook's) is
    left alone, and figures are not kept alive by pyplot's registry when explaining many images.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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
    foreground_logits: ``[N]`` raw foreground logits, or None (dense mode: no score row panels).
    spatial_shapes:    ``[L, 2]`` ``(H_l, W_l)`` of the feature levels, finest first.
    selected_indices:  per encoder layer, ``[K_k]`` token ids updated by that layer.
    oesm_indices:      per encoder layer, ``[M]`` token ids of the object self-attention; empty -> no row 3.
    detections:        ``(boxes [D, 4] xyxy in pixels of image, scores [D], labels [D])`` or None.
    image_size:        ``(h, w)`` of the network input before padding; default: the canvas.
    canvas_size:       ``(H, W)`` of the padded network input; default: finest level size times stride.
    selected_valid:    per layer ``[K_k]`` bool, False on padding slots (``EncoderTrace.selected_valid``).
    strides:           stride of each level; default 8, 16, 32, 64.
    score_threshold / max_detections: which detections are drawn (most confident first).

    Layout: row 1 = the image with detections, the foreground probability of each level over the image
    (shared colour bar), and a small chart of the share of each level's tokens kept per layer; row 2 =
    the tokens kept by each encoder layer over a darkened image, each place coloured by the finest level
    that kept a token there; row 3 = the OESM tokens of each layer, drawn the same way. Percentages are
    of the tokens inside the un-padded image. Titles number encoder layers from 1. ``fig.focus_detr_panels`` gives the
    number of panels of each kind: ``{"image", "levels", "summary", "layers", "oesm"}``.
    """
    from matplotlib.patches import Patch

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
    # Network-input pixels -> displayed-picture pixels (the picture shows exactly the un-padded input).
    sx, sy = disp_w / img_w, disp_h / img_h
    extent_img = (0.0, float(disp_w), float(disp_h), 0.0)

    n_layers, n_oesm = len(selected_indices), len(oesm_indices)
    has_scores = foreground_logits is not None
    n_summary = 1 if n_layers else 0
    row1 = 1 + (num_levels if has_scores else 0) + n_summary
    ncols = max(row1, n_layers, n_oesm, 1)
    nrows = 1 + (1 if n_layers else 0) + (1 if n_oesm else 0)

    # Panel height follows the picture's aspect ratio; ~0.35 in per row for titles, more for the colour
    # bar under row 1 and the legend under the last row.
    panel_w = (width_inches - 0.1 * ncols) / ncols  # minus the small gaps constrained layout leaves
    panel_h = panel_w * disp_h / disp_w
    heights = [panel_h + 0.35 + (0.5 if has_scores else 0.0)] + [panel_h + 0.35] * (nrows - 1)
    if nrows > 1:
        heights[-1] += 0.45
    fig = _new_figure((width_inches, sum(heights) + (0.4 if title else 0.0)))
    # One sub-figure per row: each row is laid out on its own, so the colour bar and the summary chart's
    # axis labels in row 1 cannot push the columns of the token rows out of line.
    subfigs = fig.subfigures(nrows, 1, height_ratios=heights, squeeze=False)[:, 0]
    grids = [sf.add_gridspec(1, ncols) for sf in subfigs]

    def image_axes(row: int, col: int, panel_title: str):
        ax = subfigs[row].add_subplot(grids[row][0, col])
        ax.set_xlim(0, disp_w)
        ax.set_ylim(disp_h, 0)  # crops away the padded canvas: only the un-padded image is visible
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(panel_title, fontsize=9)
        return ax

    def cell_extent(level: int) -> tuple[float, float, float, float]:
        # A level-l token (row, col) covers [col*s, (col+1)*s) x [row*s, (row+1)*s) canvas pixels.
        h_l, w_l = shapes[level]
        s = level_s[level]
        return (0.0, w_l * s * sx, h_l * s * sy, 0.0)

    # ---- row 1: detections, per-level foreground probability, summary chart --------------------------
    ax = image_axes(0, 0, "detections" if detections is not None else "image")
    ax.imshow(rgb, extent=extent_img, interpolation="bilinear")
    if detections is not None:
        # Panels are ~panel_w inches wide (constrained layout trims a little): pixels per point from that.
        _draw_detection_patches(ax, detections, class_names, score_threshold, max_detections, disp_w / (panel_w * 72.0))

    if has_scores:
        level_axes = []
        score_image = None
        for level in range(num_levels):
            h_l, w_l = shapes[level]
            ax = image_axes(0, 1 + level, f"foreground prob., stride {level_s[level]} ({h_l}\u00d7{w_l})")
            # Grayscale photo under a colour heatmap: colour then only ever means "score".
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=extent_img, interpolation="bilinear")
            score_image = ax.imshow(
                data[f"foreground_prob_level{level}"], cmap=SCORE_CMAP, vmin=0.0, vmax=1.0, alpha=0.7,
                extent=cell_extent(level), interpolation="nearest",
            )  # fmt: skip
            level_axes.append(ax)
        # Below the level panels: a colour bar on their right would take width from one grid column only
        # and shift that column in the rows below.
        cbar = subfigs[0].colorbar(
            score_image, ax=level_axes, location="bottom", shrink=0.4, fraction=0.05, pad=0.02, aspect=40
        )
        cbar.ax.tick_params(labelsize=7)
        cbar.set_label("sigmoid(foreground logit)", fontsize=7)

    if n_summary:
        ax = subfigs[0].add_subplot(grids[0][0, row1 - 1])
        _draw_summary(ax, data, num_levels, n_layers, level_s)

    # ---- rows 2 and 3: kept tokens and OESM tokens per encoder layer ------------------------------------
    dimmed = np.repeat((0.15 + 0.35 * gray)[..., None], 3, axis=2)  # dark gray photo, colours pop on it
    valid_total = max(int(data["valid_count"]), 1)

    def token_panel(row: int, col: int, key: str, panel_title: str) -> None:
        ax = image_axes(row, col, panel_title)
        ax.imshow(dimmed, extent=extent_img, interpolation="bilinear")
        # One colour per place: the finest level that kept a token there. Stacking one transparent layer
        # per level instead mixes the hues into mud wherever levels overlap.
        finest, cell = finest_level_map([data[f"{key}_level{level}"] for level in range(num_levels)], level_s)
        rgba = np.zeros((*finest.shape, 4), dtype=np.float32)
        for level in range(num_levels):
            rgba[finest == level] = (*_hex_to_rgb(LEVEL_COLORS[level % len(LEVEL_COLORS)]), 0.6)
        rows, cols = finest.shape
        ax.imshow(rgba, extent=(0.0, cols * cell * sx, rows * cell * sy, 0.0), interpolation="nearest")

    row = 1
    if n_layers:
        for k in range(n_layers):
            count = int(data["selected_count"][k])
            share = 100.0 * int(data["selected_inside_count"][k]) / valid_total  # share of in-image tokens
            token_panel(row, k, f"selected_layer{k}", f"layer {k + 1}: {count} tokens ({share:.1f}%)")
        row += 1
    if n_oesm:
        for k in range(n_oesm):
            count = int(sum(data[f"oesm_layer{k}_level{level}"].sum() for level in range(num_levels)))
            token_panel(row, k, f"oesm_layer{k}", f"layer {k + 1}: top-{count} OESM tokens")
        row += 1
    if n_layers or n_oesm:
        handles = [
            Patch(facecolor=LEVEL_COLORS[level % len(LEVEL_COLORS)], edgecolor="none", label=f"stride {level_s[level]}")
            for level in range(num_levels)
        ]
        subfigs[-1].legend(
            handles=handles, loc="outside lower center", ncols=num_levels, fontsize=8, frameon=False,
            title="token panels: finest feature level of the tokens kept at each place", title_fontsize=8,
        )  # fmt: skip
    if title:
        fig.suptitle(title, fontsize=11)
    fig.focus_detr_panels = {  # type: ignore[attr-defined]
        "image": 1,
        "levels": num_levels if has_scores else 0,
        "summary": n_summary,
        "layers": n_layers,
        "oesm": n_oesm,
    }
    return fig


def _hex_to_rgb(color: str) -> tuple[float, float, float]:
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def _draw_detection_patches(
    ax: Any,
    detections: tuple[Any, Any, Any],
    class_names: Sequence[str] | None,
    score_threshold: float,
    max_detections: int,
    data_per_point: float,
) -> None:
    """Boxes and tags in matplotlib (font in points, so tags stay legible however large the photo is).

    data_per_point: picture pixels per typographic point in this panel, to keep tags inside the panel.
    """
    from matplotlib.patches import Rectangle

    boxes, scores, labels = (_to_numpy(v) for v in detections)
    boxes = boxes.astype(np.float64).reshape(-1, 4)
    scores = scores.astype(np.float64).reshape(-1)
    labels = labels.astype(np.int64).reshape(-1)
    x_max, y_min = ax.get_xlim()[1], ax.get_ylim()[1]
    fontsize = 6.0
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold][:max_detections]
    for i in reversed(order):  # least confident first, so the best ones are drawn on top
        x0, y0, x1, y1 = boxes[i]
        label = int(labels[i])
        color = np.array(class_color(label)) / 255.0
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        text = f"{name} {scores[i]:.2f}"
        # Tag above the box, unless it would leave the panel: then just inside the box's top edge.
        # Sizes are estimates (0.6 em per character, 1.6 em tall with padding); close enough to decide.
        tag_h = 1.6 * fontsize * data_per_point
        tag_w = 0.6 * fontsize * len(text) * data_per_point
        above = y0 - tag_h >= y_min
        ax.text(
            min(x0, max(x_max - tag_w, 0.0)), y0 if above else max(y0, y_min), text,
            fontsize=fontsize, va="bottom" if above else "top", ha="left", clip_on=True,
            color=np.array(_text_color(class_color(label))) / 255.0,
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1.0, "alpha": 0.9},
        )  # fmt: skip


def _draw_summary(ax, data: dict[str, np.ndarray], num_levels: int, n_layers: int, strides: list[int]) -> None:
    """Share of each level's (in-image) tokens kept by each layer: shows where the cascade prunes."""
    layers = np.arange(1, n_layers + 1)
    for level in range(num_levels):
        valid = data[f"valid_level{level}"]
        denom = max(int(valid.sum()), 1)
        share = [100.0 * (data[f"selected_layer{k}_level{level}"] & valid).sum() / denom for k in range(n_layers)]
        ax.plot(layers, share, marker="o", markersize=4, markeredgecolor="black", markeredgewidth=0.5, linewidth=1.8,
                color=LEVEL_COLORS[level % len(LEVEL_COLORS)], label=f"stride {strides[level]}")  # fmt: skip
    total = 100.0 * data["selected_inside_count"] / max(int(data["valid_count"]), 1)
    ax.plot(layers, total, color="black", linestyle="--", linewidth=1.2, label="all")
    ax.set_xticks(layers)
    ax.set_xlabel("encoder layer", fontsize=8)
    ax.set_ylabel("tokens kept (% of level)", fontsize=8)
    ax.set_ylim(0, 105)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.set_facecolor("#e8e8e8")  # light gray: the pale level colours (yellow) stay visible
    ax.legend(fontsize=6, frameon=False)
    ax.set_title("kept tokens per level", fontsize=9)


def save_figure(fig: "Figure", path: str | os.PathLike[str], dpi: int = 150) -> None:
    """Save ``fig`` (PNG/PDF/SVG by extension) at ``dpi`` on a white background, creating the folder."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=dpi, facecolor="white")
