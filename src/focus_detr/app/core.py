"""What the web app does, without the web page: read an upload, run the model once, and draw the results.

Everything here is plain Python (numpy, Pillow, torch through the library), so it is tested without a
browser; :mod:`focus_detr.app.ui` only wires these functions to Gradio components.

The image processing is the library's: uploads are decoded by :func:`focus_detr.data.image_io.load_image`
(any pixel format, EXIF orientation, decompression-bomb guard), and one image is run through
:func:`focus_detr.inference.explain` (the model's own test-time resize and normalisation), which returns the
detections in original pixels and the token maps of :func:`focus_detr.viz.explain_arrays`. The score
threshold only filters those detections (no model run); the keep ratio re-runs the model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..model import Detections, FocusDETR
from ..data.errors import DataError
from ..model.knobs import with_keep_ratio

#: Largest upload (bytes): Gradio refuses bigger files before they reach the model; URLs are cut off there too.
MAX_UPLOAD_BYTES: int = 20 * 1024 * 1024
#: Largest image (pixels) the app decodes: 40 M pixels (e.g. 8000 x 5000) is more than any camera photo and
#: 150 MB as RGB; a tiny file that claims more (a decompression bomb) is refused before decoding.
MAX_UPLOAD_PIXELS: int = 40_000_000
#: Detections kept per image (the threshold slider filters these, without running the model again).
MAX_DETECTIONS: int = 100
#: Longest side of the focus-map pictures: larger photos are shrunk, small ones enlarged (at most 3x) so that
#: the token cells have crisp edges on screen.
FOCUS_MAP_SIDE: int = 640
#: Timeout of one URL download (seconds).
URL_TIMEOUT_S: float = 15.0

# Colours of the focus maps, as in the explain figure (focus_detr.viz.focus_maps).
_KEPT_RGB = np.array([0xFF, 0xD2, 0x1F], dtype=np.float32) / 255.0


class UploadError(Exception):
    """An input the app cannot use; ``str(e)`` is a one-line message for the page."""


# --------------------------------------------------------------------------------------------------
# Reading inputs


def read_upload(path: str | os.PathLike[str] | None, name: str | None = None) -> np.ndarray:
    """Decode an uploaded file into ``[H, W, 3]`` uint8 RGB, or raise :class:`UploadError` (one line).

    ``name`` is what the user called the file (the upload's own path is a temporary name)."""
    if path is None:
        raise UploadError("no image: upload, paste or drop a picture, or pick an example")
    label = name or Path(path).name or "the upload"
    if not os.fspath(path):
        raise UploadError(f"{label}: the upload did not arrive; try again")
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError:
        raise UploadError(f"{label}: the upload did not arrive; try again") from None
    if size > MAX_UPLOAD_BYTES:
        raise UploadError(f"{label}: {size / 2**20:.1f} MB is above the upload limit of "
                          f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB")
    from ..data.image_io import load_image

    try:
        return load_image(p, max_pixels=MAX_UPLOAD_PIXELS)
    except DataError as e:
        raise UploadError(f"{label}: {_plain_reason(e.reason)}") from None


def read_url(url: str, public_only: bool = False) -> tuple[np.ndarray, str]:
    """Download an http(s) image (timeout, size limit) and decode it; returns ``(array, file name)``.
    ``public_only``: refuse loopback, private and link-local hosts (the app when the network can reach it)."""
    from ..data.image_io import load_image
    from ..data.url_io import download_url, is_url, url_file_name

    url = (url or "").strip()
    if not is_url(url):
        raise UploadError(f"{url or 'the URL box is empty'}: give an http:// or https:// address of an image")
    try:
        path = download_url(url, timeout=URL_TIMEOUT_S, max_bytes=MAX_UPLOAD_BYTES, public_only=public_only)
    except DataError as e:
        raise UploadError(str(e)) from None
    try:
        return load_image(path, max_pixels=MAX_UPLOAD_PIXELS), url_file_name(url, "image")
    except DataError as e:
        raise UploadError(f"{url}: {_plain_reason(e.reason)}") from None
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def _plain_reason(reason: str) -> str:
    """The library's reason, with the advice that fits a command line but not a web page left out."""
    return reason.replace(" (decompression-bomb guard; raise max_pixels if the image is genuine)",
                          " (the app's limit)")


# --------------------------------------------------------------------------------------------------
# Running the model


def set_keep_ratio(model: FocusDETR, keep_ratio: float) -> FocusDETR:
    """Set the encoder's foreground keep ratio of ``model`` in place (read at every forward pass)."""
    return with_keep_ratio(model, keep_ratio)


def selects_tokens(model: FocusDETR) -> bool:
    """True when the keep ratio means something (focus and sparse encoders; a dense one keeps every token)."""
    return model.cfg.encoder.mode != "dense"


@dataclass
class Analysis:
    """One image run through the model once: everything the page shows comes from here.

    image:      ``[H, W, 3]`` uint8, the decoded upload (original pixels).
    detections: the best :data:`MAX_DETECTIONS`, any score, boxes in original pixels, most confident first.
    arrays:     :func:`focus_detr.inference.explain`'s arrays (token maps per level and layer, counts).
    keep_ratio: the encoder keep ratio used (None for a dense encoder).
    forward_ms: the model's forward pass (backbone, encoder, decoder), measured around ``model.forward``.
    encoder_ms: the encoder's part of it.
    name:       the file name shown in the page and used for downloads.
    """

    image: np.ndarray
    detections: Detections
    arrays: dict[str, np.ndarray]
    keep_ratio: float | None
    forward_ms: float
    encoder_ms: float
    name: str = "image"

    @property
    def num_layers(self) -> int:
        return int(len(self.arrays["selected_count"]))

    @property
    def num_levels(self) -> int:
        return sum(1 for k in self.arrays if k.startswith("valid_level"))


class _Stopwatch:
    """Times ``module.forward`` calls with forward hooks (so the model's own code is not touched)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds = 0.0
        self._start = 0.0
        self._handles = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]

    def _begin(self, *_: Any) -> None:
        self._start = time.perf_counter()

    def _end(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._start

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def analyse(model: FocusDETR, image: np.ndarray, keep_ratio: float | None = None, name: str = "image") -> Analysis:
    """Run ``image`` through ``model`` (at ``keep_ratio``, when given and the encoder selects tokens) with
    :func:`focus_detr.inference.explain`; time the forward pass and the encoder."""
    from ..inference import explain

    if keep_ratio is not None and selects_tokens(model):
        set_keep_ratio(model, keep_ratio)
    watches = [_Stopwatch(model), _Stopwatch(model.encoder)]
    try:
        explanation = explain(model, image, score_threshold=0.0, max_detections=MAX_DETECTIONS, figure=False)
    finally:
        for w in watches:
            w.close()
    return Analysis(image=image, detections=explanation.detections, arrays=explanation.arrays,
                    keep_ratio=model.cfg.encoder.keep_ratio if selects_tokens(model) else None,
                    forward_ms=1000.0 * watches[0].seconds, encoder_ms=1000.0 * watches[1].seconds, name=name)


# --------------------------------------------------------------------------------------------------
# Detections: picture, table, COCO json


def above(detections: Detections, threshold: float) -> Detections:
    """The detections with ``score >= threshold`` (order kept: most confident first)."""
    keep = detections.scores >= threshold
    idx = torch.nonzero(keep).flatten().tolist()
    return Detections(detections.boxes[keep], detections.scores[keep], detections.labels[keep],
                      [detections.names[i] for i in idx], detections.query_indices[keep])


def draw(analysis: Analysis, threshold: float) -> Image.Image:
    """The picture with the detections above ``threshold`` drawn by the library (:meth:`Detections.plot`)."""
    return analysis.detections.plot(analysis.image, score_threshold=threshold)


TABLE_HEADERS: tuple[str, ...] = ("#", "class", "score", "x0", "y0", "x1", "y1")


def table_rows(detections: Detections) -> list[list[Any]]:
    """One row per detection: number, class name, score and the box corners in original pixels."""
    rows = []
    for k, (box, score, name) in enumerate(zip(detections.boxes.tolist(), detections.scores.tolist(),
                                               detections.names), start=1):
        rows.append([k, name, round(float(score), 3), *(round(float(v), 1) for v in box)])
    return rows


def write_coco_json(analysis: Analysis, threshold: float, folder: str | os.PathLike[str]) -> Path:
    """Write the detections above ``threshold`` in the COCO results format (:meth:`Detections.to_coco`: a
    list of ``{image_id: 1, category_id: class id, bbox: [x, y, w, h], score}``, what ``focus-detr predict``
    writes) and return the file."""
    kept = above(analysis.detections, threshold)
    stem = Path(analysis.name).stem or "image"
    out = Path(folder) / f"{stem}_detections.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    records = kept.to_coco(image_id=1)
    for r in records:
        r["bbox"] = [round(v, 2) for v in r["bbox"]]
        r["score"] = round(r["score"], 5)
    out.write_text(json.dumps(records, indent=1) + "\n")
    return out


# --------------------------------------------------------------------------------------------------
# Text for the page


def summary_markdown(analysis: Analysis, threshold: float) -> str:
    """Detections shown, tokens kept at this keep ratio, and the measured time."""
    n = int((analysis.detections.scores >= threshold).sum())
    h, w = (int(v) for v in analysis.arrays["image_size"])
    ih, iw = (int(v) for v in analysis.arrays["input_size"])
    lines = [f"**{n} detection{'s' if n != 1 else ''}** with score ≥ {threshold:.2f} in {analysis.name} "
             f"({w}×{h} pixels, seen by the model at {iw}×{ih})."]
    lines.append(tokens_markdown(analysis))
    return "\n\n".join(lines)


def tokens_markdown(analysis: Analysis) -> str:
    """``keep ratio 0.50: 1,234 of 4,567 tokens kept (27 %) · forward 85 ms (encoder 30 ms)``."""
    valid = max(int(analysis.arrays["valid_count"]), 1)
    inside = [int(v) for v in analysis.arrays["selected_inside_count"]]
    timing = f"model forward **{analysis.forward_ms:.0f} ms** (encoder {analysis.encoder_ms:.0f} ms)"
    if analysis.keep_ratio is None:
        return f"Dense encoder: every one of the {valid:,} tokens is updated in every layer · {timing}."
    per_layer = ", ".join(f"layer {k + 1}: {c:,}" for k, c in enumerate(inside))
    first = inside[0] if inside else 0
    return (f"Keep ratio **{analysis.keep_ratio:.2f}**: **{first:,} of {valid:,} tokens kept** "
            f"({100.0 * first / valid:.0f} %; {per_layer}) · {timing}.")


# --------------------------------------------------------------------------------------------------
# Focus maps (the explain figure's panels, one picture each, for the page)


FOREGROUND_CAPTION = ("How sure the model is, for each place in the picture, that it belongs to an object "
                      "(dark = background, bright = object), once per feature-map resolution.")
KEPT_CAPTION = ("The places this encoder layer spends its computation on: yellow marks the share of a place's "
                "tokens that the layer updates; the dark rest is passed through unchanged.")
OESM_CAPTION = ("The most object-like tokens of this layer, which also exchange information with each other "
                "(one dot per token, coloured by feature-map resolution).")


def _strides(analysis: Analysis) -> list[int]:
    from ..viz import level_strides

    return level_strides(analysis.num_levels)


def _display(analysis: Analysis) -> tuple[np.ndarray, float, float]:
    """The picture scaled to :data:`FOCUS_MAP_SIDE` (enlarged at most 3x) as float RGB in [0, 1], and the
    factors that turn its pixel coordinates into network-input pixels ``(sy, sx)``."""
    pil = Image.fromarray(analysis.image)
    w, h = pil.size
    scale = min(3.0, FOCUS_MAP_SIDE / max(w, h))
    if scale != 1.0:
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    rgb = np.asarray(pil, dtype=np.float32) / 255.0
    ih, iw = (int(v) for v in analysis.arrays["input_size"])
    return rgb, ih / rgb.shape[0], iw / rgb.shape[1]


def _sample(grid: np.ndarray, cell: float, shape: tuple[int, int], sy: float, sx: float) -> np.ndarray:
    """Look up ``grid`` (cells of ``cell`` network-input pixels) at the centre of every displayed pixel."""
    rows = np.minimum(((np.arange(shape[0]) + 0.5) * sy // cell).astype(np.int64), grid.shape[0] - 1)
    cols = np.minimum(((np.arange(shape[1]) + 0.5) * sx // cell).astype(np.int64), grid.shape[1] - 1)
    return grid[rows[:, None], cols[None, :]]


def _gray(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _to_image(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8))


def foreground_maps(analysis: Analysis) -> list[tuple[Image.Image, str]]:
    """Per feature level, the foreground probability over the gray picture (inferno colours), with a
    caption naming the level's cell size; empty for a dense encoder (no foreground scores)."""
    from matplotlib import colormaps

    from ..viz.focus_maps import SCORE_CMAP

    rgb, sy, sx = _display(analysis)
    gray = np.repeat(_gray(rgb)[..., None], 3, axis=2)
    cmap = colormaps[SCORE_CMAP]
    out = []
    for level, stride in enumerate(_strides(analysis)):
        key = f"foreground_prob_level{level}"
        if key not in analysis.arrays:
            return []
        prob = analysis.arrays[key]
        values = _sample(prob, stride, rgb.shape[:2], sy, sx)
        colour = cmap(values)[..., :3].astype(np.float32)
        h_l, w_l = prob.shape
        out.append((_to_image(0.3 * gray + 0.7 * colour), f"{stride} px: {h_l}×{w_l}"))
    return out


def kept_map(analysis: Analysis, layer: int) -> tuple[Image.Image, str]:
    """Encoder layer ``layer`` (0-based): the share of each place's tokens it updates, in yellow over the
    darkened picture (:func:`focus_detr.viz.kept_share_map`), and a caption with the count."""
    from ..viz import kept_share_map

    layer = _check_layer(analysis, layer)
    strides = _strides(analysis)
    levels = range(analysis.num_levels)
    share, cell = kept_share_map([analysis.arrays[f"selected_layer{layer}_level{lv}"] for lv in levels],
                                 [analysis.arrays[f"valid_level{lv}"] for lv in levels], strides)
    rgb, sy, sx = _display(analysis)
    alpha = 0.9 * np.nan_to_num(_sample(share, cell, rgb.shape[:2], sy, sx))[..., None]
    dimmed = np.repeat((0.15 + 0.35 * _gray(rgb))[..., None], 3, axis=2)
    picture = _to_image(dimmed * (1.0 - alpha) + _KEPT_RGB * alpha)
    count = int(analysis.arrays["selected_inside_count"][layer])
    valid = max(int(analysis.arrays["valid_count"]), 1)
    return picture, f"layer {layer + 1} of {analysis.num_layers}: {count:,} of {valid:,} tokens updated " \
                    f"({100.0 * count / valid:.1f} %)"


def oesm_map(analysis: Analysis, layer: int) -> tuple[Image.Image, str] | None:
    """Encoder layer ``layer``'s object-enhanced self-attention tokens, one dot each at its cell's centre,
    coloured by level (coarse levels on top); None when the encoder has none (sparse, dense)."""
    from PIL import ImageDraw

    from ..viz.focus_maps import LEVEL_COLORS

    layer = _check_layer(analysis, layer)
    if f"oesm_layer{layer}_level0" not in analysis.arrays:
        return None
    rgb, sy, sx = _display(analysis)
    picture = _to_image(np.repeat((0.15 + 0.35 * _gray(rgb))[..., None], 3, axis=2))
    canvas = ImageDraw.Draw(picture)
    strides = _strides(analysis)
    total = 0
    for level in reversed(range(analysis.num_levels)):
        rows, cols = np.nonzero(analysis.arrays[f"oesm_layer{layer}_level{level}"])
        total += len(rows)
        s = strides[level]
        radius = float(np.clip(0.35 * s / max(sx, sy), 2.0, 6.0))
        for r, c in zip(rows.tolist(), cols.tolist()):
            x, y = (c + 0.5) * s / sx, (r + 0.5) * s / sy
            canvas.ellipse((x - radius, y - radius, x + radius, y + radius), fill=LEVEL_COLORS[level % len(LEVEL_COLORS)],
                           outline=(0, 0, 0))
    legend = ", ".join(f"{LEVEL_NAMES[i % len(LEVEL_NAMES)]} = {s}-px cells" for i, s in enumerate(strides))
    return picture, f"layer {layer + 1}: the {total:,} top-scoring tokens ({legend})"


# Plain names of LEVEL_COLORS (focus_detr.viz.focus_maps), for the legend in the caption.
LEVEL_NAMES: tuple[str, ...] = ("yellow", "cyan", "pink", "blue", "orange", "gray")


def _check_layer(analysis: Analysis, layer: int) -> int:
    layer = int(layer)
    if not 0 <= layer < max(analysis.num_layers, 1):
        raise ValueError(f"layer {layer + 1} does not exist: the encoder has {analysis.num_layers} layers")
    return layer


# --------------------------------------------------------------------------------------------------
# Example images


@dataclass(frozen=True)
class Example:
    path: Path
    label: str


#: Photographs that ship with scikit-image, if installed (CC0 / public domain: see the docstrings of
#: skimage.data.chelsea, .coffee and .astronaut).
SKIMAGE_PHOTOS: tuple[tuple[str, str], ...] = (("chelsea.png", "a cat"), ("coffee.png", "a cup of coffee"),
                                               ("astronaut.png", "an astronaut"))


def example_images(folder: str | os.PathLike[str], num_shapes: int = 3) -> list[Example]:
    """The app's examples: the first ``num_shapes`` held-out images of the demo's synthetic shapes dataset
    (generated into ``folder``: the same pictures as ``runs/demo/data/images/val``), then real photographs
    that ship with installed packages (matplotlib's Grace Hopper, scikit-image's cat, coffee and astronaut)."""
    from ..data.synthetic import make_shapes_dataset

    examples = []
    if num_shapes > 0:
        info = make_shapes_dataset(Path(folder) / "shapes", num_train=0, num_val=num_shapes)
        for k, path in enumerate(sorted(info.val_image_dir.iterdir())[:num_shapes], start=1):
            examples.append(Example(path, f"held-out shapes {k}"))
    examples.extend(photo_examples())
    return examples


def photo_examples() -> list[Example]:
    """Photographs found in installed packages (none when neither matplotlib nor scikit-image is there)."""
    found = []
    try:
        from matplotlib import cbook

        found.append(Example(Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)), "Grace Hopper"))
    except (ImportError, OSError, ValueError):
        pass
    try:
        import skimage.data

        root = Path(skimage.data.__file__).parent
        found.extend(Example(root / name, label) for name, label in SKIMAGE_PHOTOS if (root / name).is_file())
    except ImportError:
        pass
    return [e for e in found if e.path.is_file()]


def new_work_folder() -> Path:
    """A private temporary folder for generated examples and downloads (removed by the caller)."""
    return Path(tempfile.mkdtemp(prefix="focus-detr-app-"))


__all__ = ["MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "MAX_DETECTIONS", "UploadError", "read_upload", "read_url",
           "set_keep_ratio", "selects_tokens", "Analysis", "analyse", "above", "draw", "TABLE_HEADERS",
           "table_rows", "write_coco_json", "summary_markdown", "tokens_markdown", "FOREGROUND_CAPTION",
           "KEPT_CAPTION", "OESM_CAPTION", "foreground_maps", "kept_map", "oesm_map", "Example",
           "example_images", "photo_examples", "new_work_folder"]
