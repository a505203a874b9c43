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


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
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
    """Tag font size: at least 10 px (smaller stops being legible), ~19 px at 1333x800."""
    return max(10, round(math.sqrt(width * height) / 55))


def draw_detections(
    image: Image.Image | np.ndarray,
    boxes: Any,
    scores: Any,
    labels: Any,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.0,
    line_width: int | None = None,
    font_size: int | None = None,
) -> Image.Image:
    """Draw boxes with "name score" tags; returns a new RGB image of the input's size.

    image:           PIL image (any mode) or array / tensor ``[H, W]``, ``[H, W, C]`` or ``[C, H, W]``.
    boxes:           ``[K, 4]`` ``(x0, y0, x1, y1)`` in pixels of ``image`` (tensor or array).
    scores:          ``[K]`` confidences in ``[0, 1]``.
    labels:          ``[K]`` integer class ids; the colour is ``class_color(label)``.
    class_names:     name of each class id; ids outside it are written as numbers.
    score_threshold: detections with ``score < score_threshold`` are not drawn.
    line_width / font_size: override the size-dependent defaults.

    The input is never modified. With no detection left, the result is an RGB copy of the input.
    """
    canvas = to_pil_rgb(image)
    width, height = canvas.size
    boxes_np = _to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    scores_np = _to_numpy(scores).astype(np.float64).reshape(-1)
    labels_np = _to_numpy(labels).astype(np.int64).reshape(-1)
    if not (len(boxes_np) == len(scores_np) == len(labels_np)):
        lengths = (len(boxes_np), len(scores_np), len(labels_np))
        raise ValueError(f"boxes, scores and labels must have the same length, got {lengths}")
    keep = (scores_np >= score_threshold) & np.isfinite(boxes_np).all(axis=1) & np.isfinite(scores_np)
    if not keep.any():
        return canvas
    # Lowest score first, so the most confident boxes and tags end up on top.
    order = np.argsort(scores_np[keep], kind="stable")
    boxes_np, scores_np, labels_np = boxes_np[keep][order], scores_np[keep][order], labels_np[keep][order]

    lw = line_width if line_width is not None else default_line_width(width, height)
    font = load_font(font_size if font_size is not None else default_font_size(width, height))
    draw = ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), score, label in zip(boxes_np, scores_np, labels_np):
        # Clip to the image and normalise the corner order, so odd boxes never raise or vanish.
        x0, x1 = sorted((min(max(x0, 0.0), width - 1.0), min(max(x1, 0.0), width - 1.0)))
        y0, y1 = sorted((min(max(y0, 0.0), height - 1.0), min(max(y1, 0.0), height - 1.0)))
        color = class_color(int(label))
        draw.rectangle((x0, y0, x1, y1), outline=color, width=lw)

        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(int(label))
        _draw_tag(draw, f"{name} {score:.2f}", (x0, y0, x1, y1), color, font, width, height)
    return canvas


def _draw_tag(
    draw: ImageDraw.ImageDraw,
    text: str,
    box: tuple[float, float, float, float],
    color: tuple[int, int, int],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    width: int,
    height: int,
) -> None:
    """A filled tag with ``text``, sitting on the box's top edge, moved so that it stays in the image."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_w, text_h = right - left, bottom - top
    pad = max(1, round(text_h * 0.25))
    tag_w, tag_h = text_w + 2 * pad, text_h + 2 * pad
    x0, y0, _, _ = box
    # Above the box when there is room (keeps the object visible), else just inside its top edge.
    ty = y0 - tag_h if y0 - tag_h >= 0 else y0
    # Keep it inside the image; a tag wider/taller than a tiny image is pinned to the top-left corner.
    tx = min(max(x0, 0.0), max(width - tag_w, 0))
    ty = min(max(ty, 0.0), max(height - tag_h, 0))
    draw.rectangle((tx, ty, tx + tag_w - 1, ty + tag_h - 1), fill=color)
    # textbbox is relative to the anchor and can start below/right of it (font ascent), hence -left/-top.
    draw.text((tx + pad - left, ty + pad - top), text, fill=_text_color(color), font=font)
