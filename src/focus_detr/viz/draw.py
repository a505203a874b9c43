"""Drawing detections on an image with Pillow only (no matplotlib, no font files).

The result is meant to be looked at by people: one stable colour per class, boxes whose line width
follows the image size, and a "name 0.87" tag on a filled background whose text colour is picked for
contrast with that background, so it reads the same on light and dark photos.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# 20 distinct hues of medium lightness (after Sasha Trubetskoy's "20 simple distinct colors", with the
# near-black, near-white and pastel entries replaced): a box must stay visible on dark and on light
# photos alike. Consecutive class ids get very different hues. Class ``c`` uses ``PALETTE[c % 20]``.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (255, 170, 0),  # amber
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 210, 220),  # cyan
    (240, 50, 230),  # magenta
    (170, 210, 40),  # lime
    (250, 110, 150),  # pink
    (0, 150, 140),  # teal
    (150, 110, 255),  # violet
    (170, 110, 40),  # brown
    (235, 205, 30),  # yellow
    (200, 60, 40),  # brick
    (90, 200, 140),  # mint
    (128, 128, 0),  # olive
    (255, 140, 110),  # salmon
    (60, 90, 220),  # royal blue
    (128, 128, 128),  # gray
)


def class_color(label: int) -> tuple[int, int, int]:
    """The RGB colour used for class id ``label`` (stable across images and calls)."""
    return PALETTE[int(label) % len(PALETTE)]


def _to_numpy(x: Any) -> np.ndarray:
    """Tensor / array / sequence -> numpy, without importing torch here."""
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def to_pil_rgb(image: Image.Image | np.ndarray | Any) -> Image.Image:
    """Any reasonable image -> a new RGB ``PIL.Image``.

    Accepts a PIL image of any mode, or an array / tensor shaped ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``
    (C in 1, 3, 4), either uint8 or float (float in ``[0, 1]`` is scaled by 255, larger floats are taken as
    0..255). Transparent pixels are composited over white, the usual background of transparent pictures.
    """
    if isinstance(image, Image.Image):
        pil = image
    else:
        arr = _to_numpy(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.transpose(arr, (1, 2, 0))  # CHW (torch layout) -> HWC
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"cannot interpret an array of shape {arr.shape} as an image")
        if arr.dtype != np.uint8:
            arr = arr.astype(np.float64)
            if arr.size and np.nanmax(arr) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
        pil = Image.fromarray(arr)
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        rgba = pil.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return pil.convert("RGB")  # convert() always returns a new image, so the input is never modified


def load_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font at ``size`` px (Pillow >= 10.1), else the fixed-size bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with ``background`` (WCAG relative luminance)."""

    def channel(c: int) -> float:
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in background)
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    # Contrast ratio with black is (lum + 0.05) / 0.05, with white 1.05 / (lum + 0.05); they are equal
    # at lum ~= 0.179.
    return (0, 0, 0) if lum > 0.179 else (255, 255, 255)


def default_line_width(width: int, height: int) -> int:
    """Box line width for an image of this size: 1 px up to ~375 px, ~4 px at 1333x800."""
    return max(1, round(math.sqrt(width * height) / 250))


def default_font_size(width: int, height: int) -> int:
    """Tag font size, relative to the image: ~19 px at 1333x800, never below 9 px (smaller is not legible)."""
    return max(9, round(math.sqrt(width * height) / 55))


#: A tag may be at most this share of the image's width / height; bigger tags (small images) go to the legend.
MAX_TAG_WIDTH_SHARE = 0.6
MAX_TAG_HEIGHT_SHARE = 0.2
#: Detections listed in a legend at most (the rest are summed up in one line).
MAX_LEGEND_ENTRIES = 24


def detection_arrays(detections: Any, scores: Any = None, labels: Any = None,
                     class_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(boxes [K, 4] float64, scores [K], labels [K] int64, names [K])`` from any of:

    * a :class:`focus_detr.Detections` (or anything with ``boxes``, ``scores``, ``labels``, ``names``);
    * a ``supervision.Detections`` (``xyxy``, ``confidence``, ``class_id``);
    * ``boxes, scores, labels`` given separately (tensors, arrays or lists), names from ``class_names``.
    """
    names: list[str] | None = None
    if scores is None and labels is None and hasattr(detections, "xyxy"):  # supervision.Detections
        boxes, scores, labels = detections.xyxy, detections.confidence, detections.class_id
        if scores is None:
            scores = np.ones(len(boxes))
        data = getattr(detections, "data", {}) or {}
        if "class_name" in data and class_names is None:
            names = [str(n) for n in data["class_name"]]
    elif scores is None and labels is None and hasattr(detections, "boxes") and hasattr(detections, "scores"):
        boxes, scores, labels = detections.boxes, detections.scores, detections.labels
        if class_names is None and getattr(detections, "names", None) is not None:
            names = [str(n) for n in detections.names]
    elif scores is None or labels is None:
        raise TypeError("pass a Detections object, or boxes, scores and labels")
    else:
        boxes = detections
    boxes_np = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    scores_np = _to_numpy(scores).astype(np.float64).reshape(-1)
    labels_np = _to_numpy(labels).astype(np.int64).reshape(-1)
    if not (len(boxes_np) == len(scores_np) == len(labels_np)) or (names is not None and len(names) != len(boxes_np)):
        lengths = (len(boxes_np), len(scores_np), len(labels_np))
        raise ValueError(f"boxes, scores and labels must have the same length, got {lengths}")
    if names is None:
        names = [class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(int(c))
                 for c in labels_np.tolist()]
    return boxes_np, scores_np, labels_np, names


def draw_detections(
    image: Image.Image | np.ndarray,
    detections: Any,
    scores: Any = None,
    labels: Any = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    line_width: int | None = None,
    font_size: int | None = None,
    legend: bool = True,
) -> Image.Image:
    """Draw boxes with "name score" tags placed so that they do not overlap; returns a new RGB image.

    Call it as ``draw_detections(image, detections)`` with a :class:`focus_detr.Detections` (or a
    ``supervision.Detections``), or as ``draw_detections(image, boxes, scores, labels, class_names)``:

    image:           PIL image (any mode) or array / tensor ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``.
    boxes:           ``[K, 4]`` ``(x0, y0, x1, y1)`` in pixels of ``image`` (tensor or array).
    scores:          ``[K]`` confidences in ``[0, 1]``.
    labels:          ``[K]`` integer class ids; the colour is ``class_color(label)``.
    class_names:     name of each class id; ids outside it are written as numbers.
    score_threshold: detections with ``score < score_threshold`` are not drawn.
    line_width / font_size: override the defaults, which follow the image size.
    legend:          see below; False always keeps the input's size.

    Tags are placed most confident first, each at the first free place among: above the box, inside its
    top edge, below it, inside its bottom edge (left-aligned, then right-aligned), never over an earlier
    tag. A detection whose tag finds no free place, or whose tag would cover too much of a small image
    (more than 60 % of its width or 20 % of its height), gets a small number on its box instead, and is
    listed with that number in a legend strip added *below* the picture (the result is then taller than
    the input, and at least as wide as one legend entry). With ``legend=False`` those boxes keep only
    their class colour. The input is never modified.
    """
    canvas = to_pil_rgb(image)
    width, height = canvas.size
    boxes_np, scores_np, labels_np, names = detection_arrays(detections, scores, labels, class_names)
    keep = (scores_np >= score_threshold) & np.isfinite(boxes_np).all(axis=1) & np.isfinite(scores_np)
    if not keep.any():
        return canvas
    # Most confident first: they get the best tag places, and are drawn last (on top).
    order = np.flatnonzero(keep)[np.argsort(-scores_np[keep], kind="stable")]

    lw = line_width if line_width is not None else default_line_width(width, height)
    font = load_font(font_size if font_size is not None else default_font_size(width, height))
    draw = ImageDraw.Draw(canvas)
    clipped = {}
    for i in order:
        # Clip to the image and normalise the corner order, so odd boxes never raise or vanish.
        x0, y0, x1, y1 = boxes_np[i]
        x0, x1 = sorted((min(max(x0, 0.0), width - 1.0), min(max(x1, 0.0), width - 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), height - 1.0), min(max(y1, 0.0), height - 1.0)))
        clipped[i] = (x0, y0, x1, y1)
    for i in order[::-1]:  # least confident drawn first, so the best boxes end up on top
        draw.rectangle(clipped[i], outline=class_color(int(labels_np[i])), width=lw)

    texts = [f"{names[i]} {scores_np[i]:.2f}" for i in order]
    placed: list[tuple[float, float, float, float]] = []
    spots = place_tags([clipped[i] for i in order], [_tag_size(draw, t, font) for t in texts], width, height, placed)
    tags = [(i, t, spot) for i, t, spot in zip(order, texts, spots) if spot is not None]
    untagged = [i for i, spot in zip(order, spots) if spot is None]
    numbers: list[tuple[int, str, tuple[float, float]]] = []
    if untagged and legend:
        small = load_font(max(7, round(font.size * 0.8)) if hasattr(font, "size") else 10)
        for n, i in enumerate(untagged[:MAX_LEGEND_ENTRIES], start=1):
            size = _tag_size(draw, str(n), small)
            spot = _free_spot(clipped[i], size, placed, width, height, inside_first=True)
            spot = spot if spot is not None else (clipped[i][0], clipped[i][1])  # crowded: on the corner anyway
            placed.append((*spot, spot[0] + size[0], spot[1] + size[1]))
            numbers.append((i, str(n), spot))
    for i, text, spot in tags[::-1]:
        _draw_tag(draw, text, spot, class_color(int(labels_np[i])), font)
    for i, text, spot in numbers[::-1]:
        _draw_tag(draw, text, spot, class_color(int(labels_np[i])), small)
    if not (untagged and legend):
        return canvas
    entries = [(f"{n}  {names[i]} {scores_np[i]:.2f}", class_color(int(labels_np[i])))
               for n, i in enumerate(untagged[:MAX_LEGEND_ENTRIES], start=1)]
    if len(untagged) > MAX_LEGEND_ENTRIES:
        rest = untagged[MAX_LEGEND_ENTRIES:]
        entries.append((f"+ {len(rest)} more (scores {scores_np[rest].min():.2f}-{scores_np[rest].max():.2f})",
                        (128, 128, 128)))
    return _add_legend(canvas, entries)


def place_tags(boxes: Sequence[tuple[float, float, float, float]], sizes: Sequence[tuple[float, float]],
               width: float, height: float, placed: list[tuple[float, float, float, float]] | None = None,
               max_width_share: float = MAX_TAG_WIDTH_SHARE,
               max_height_share: float = MAX_TAG_HEIGHT_SHARE) -> list[tuple[float, float] | None]:
    """Where each box's tag goes: its top-left corner, or None when it has no free place.

    boxes:  ``(x0, y0, x1, y1)`` inside a ``width x height`` image, in priority order (most confident first).
    sizes:  ``(w, h)`` of each tag, same units.
    placed: rectangles already taken (extended with the tags placed here).
    A tag larger than ``max_width_share`` of the width or ``max_height_share`` of the height gets None
    (it would cover too much of a small image). Placed tags lie inside the image and never overlap.
    """
    placed = [] if placed is None else placed
    spots: list[tuple[float, float] | None] = []
    for box, (tw, th) in zip(boxes, sizes):
        too_big = tw > max_width_share * width or th > max_height_share * height
        spot = None if too_big else _free_spot(box, (tw, th), placed, width, height)
        if spot is not None:
            placed.append((spot[0], spot[1], spot[0] + tw, spot[1] + th))
        spots.append(spot)
    return spots


def _tag_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, round((bottom - top) * 0.25))
    return right - left + 2 * pad, bottom - top + 2 * pad


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _free_spot(box: tuple[float, float, float, float], size: tuple[int, int],
               placed: Sequence[tuple[float, float, float, float]], width: int, height: int,
               inside_first: bool = False) -> tuple[float, float] | None:
    """Top-left corner of the first candidate place for a ``size`` tag that lies inside the image and
    overlaps no ``placed`` tag, or None. Candidates: above the box, inside its top edge, below it, inside
    its bottom edge; each left-aligned, then right-aligned (``inside_first``: inside places first)."""
    x0, y0, x1, y1 = box
    tw, th = size
    rows = [y0 - th, y0, y1 + 1, y1 - th + 1]
    if inside_first:
        rows = [y0, y1 - th + 1, y0 - th, y1 + 1]
    for ty in rows:
        for tx in (x0, x1 - tw + 1):
            tx = min(max(tx, 0.0), width - tw)  # slide along the edge to stay inside the image
            if ty < 0 or ty + th > height or tx < 0:
                continue
            rect = (tx, ty, tx + tw, ty + th)
            if not any(_overlaps(rect, other) for other in placed):
                return tx, ty
    return None


def _draw_tag(draw: ImageDraw.ImageDraw, text: str, spot: tuple[float, float], color: tuple[int, int, int],
              font: Any) -> None:
    """A filled tag with ``text`` whose top-left corner is ``spot``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = max(1, round((bottom - top) * 0.25))
    tx, ty = spot
    draw.rectangle((tx, ty, tx + right - left + 2 * pad - 1, ty + bottom - top + 2 * pad - 1), fill=color)
    # textbbox is relative to the anchor and can start below/right of it (font ascent), hence -left/-top.
    draw.text((tx + pad - left, ty + pad - top), text, fill=text_color(color), font=font)


def _add_legend(picture: Image.Image, entries: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """``picture`` with a white strip below listing ``entries`` (text, colour) in as many columns as fit."""
    font = load_font(max(11, default_font_size(*picture.size) - 2))
    probe = ImageDraw.Draw(picture)
    sizes = [_tag_size(probe, text, font) for text, _ in entries]
    swatch = max(h for _, h in sizes)
    cell_w = max(w for w, _ in sizes) + swatch + 12
    line_h = swatch + 4
    columns = max(1, (picture.width - 8) // cell_w)
    if -(-len(entries) // columns) > 8:  # a narrow picture with a long list: widen rather than grow very tall
        columns = max(columns, min(3, -(-len(entries) // 8)))
    width = max(picture.width, columns * cell_w + 8)
    rows = -(-len(entries) // columns)
    out = Image.new("RGB", (width, picture.height + rows * line_h + 8), (255, 255, 255))
    out.paste(picture, (0, 0))
    draw = ImageDraw.Draw(out)
    for k, ((text, color), _) in enumerate(zip(entries, sizes)):
        x = 4 + (k // rows) * cell_w
        y = picture.height + 4 + (k % rows) * line_h
        draw.rectangle((x, y + 2, x + swatch - 4, y + swatch - 2), fill=color)
        left, top, _, _ = draw.textbbox((0, 0), text, font=font)
        draw.text((x + swatch - left, y + 2 - top + 1), text, fill=(0, 0, 0), font=font)
    return out
