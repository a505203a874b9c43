"""Reading images robustly into ``[H, W, 3]`` uint8 RGB arrays.

The official pipeline (detectron2 ``read_image(..., format="RGB")``) opens a file with PIL, applies the EXIF
orientation and calls ``convert("RGB")``. That silently produces garbage for 16-bit and float images, and
PIL's own errors for broken files do not say which file of a dataset is broken. Here every failure becomes a
:class:`~focus_detr.data.errors.DataError` naming the file, and every pixel format is mapped to 8-bit RGB
by a documented rule:

==================  ==========================================================================================
PIL mode / dtype    conversion
==================  ==========================================================================================
RGB, uint8          unchanged
1, L, P, CMYK,      PIL ``convert("RGB")`` (grey replicated to 3 channels; palette looked up; CMYK naive)
YCbCr, ...
RGBA, LA, PA, P     alpha composited over white (``alpha="composite"``, what an image viewer shows) or
with transparency   dropped (``alpha="drop"``, what detectron2 does)
I;16*, I, ints      negative values clipped to 0; if the maximum is <= 255 the values are used as they are
                    (8-bit data stored in a wider type), otherwise scaled by ``255 / (2**b - 1)`` with ``b``
                    the bit length of the maximum (a 12-bit image with max 4095 uses its full range, a
                    full-range 16-bit image is divided by 257)
F, floats           non-finite -> 0, negatives -> 0; maximum <= 1 means a 0..1 image (x 255); maximum <= 255
                    means a 0..255 image (unchanged); larger maxima are scaled to 255
bool                True -> 255
==================  ==========================================================================================

This module, :mod:`focus_detr.data.url_io` and :mod:`focus_detr.data.errors` are the decoding leaf of
``data``: they import nothing else of the project. :meth:`focus_detr.model.FocusDETR.predict` imports this
module lazily (the one place the model reaches into ``data``, see README "Layout"), so keep it a leaf.
Resizing and conversion to the network input are :func:`focus_detr.model.preprocess.preprocess`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import DataError, DataWarning
from .url_io import download_url, is_url

# Decompression-bomb guard: images with more pixels are refused before decoding. 100 M pixels is a
# 10000 x 10000 image, 300 MB as RGB uint8 -- far larger than any detection input (COCO images are
# ~0.3 M pixels and are resized to <= 1333 x 800 anyway), yet small enough that a hostile header cannot
# make a DataLoader worker allocate gigabytes. PIL's own guard (``Image.MAX_IMAGE_PIXELS``, which errors
# above ~179 M pixels) still applies on top of this one.
MAX_IMAGE_PIXELS: int = 100_000_000

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_HIGH_DEPTH_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;32", "I;32L", "I;32B"}


def load_image(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS, alpha: str = "composite") -> np.ndarray:
    """Read an image file as an ``[H, W, 3]`` uint8 RGB array, EXIF orientation applied.

    Args:
        path: image file (any format PIL reads: JPEG, PNG, BMP, TIFF, WebP, GIF (first frame), ...).
        max_pixels: refuse images with more than this many pixels (see :data:`MAX_IMAGE_PIXELS`).
        alpha: ``"composite"`` (over white) or ``"drop"`` -- how to treat an alpha channel.

    Raises:
        DataError: naming ``path`` -- missing, a directory, zero bytes, not an image, truncated or otherwise
        undecodable, too many pixels, or a pixel mode that cannot be converted.
    """
    p = Path(path)
    if not p.exists():
        raise DataError("image file not found", p)
    if p.is_dir():
        raise DataError("expected an image file, found a directory", p)
    try:
        nbytes = p.stat().st_size
    except OSError as e:
        raise DataError(f"cannot read image file ({e})", p) from e
    if nbytes == 0:
        raise DataError("image file is empty (0 bytes)", p)

    with warnings.catch_warnings():
        # Our own limit below replaces PIL's DecompressionBombWarning (which fires at ~89 M pixels).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(p) as img:
                w, h = img.size
                if w <= 0 or h <= 0:
                    raise DataError(f"image has an empty size {w}x{h}", p)
                if w * h > max_pixels:
                    raise DataError(
                        f"image is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                        "(decompression-bomb guard; raise max_pixels if the image is genuine)", p)
                # load() decodes now, inside the try, so truncation errors are reported with the path.
                img.load()
                img = _apply_exif_orientation(img, p)
                return _pil_to_rgb(img, alpha, p)
        except DataError:
            raise
        except Image.DecompressionBombError as e:
            raise DataError(f"image too large (PIL decompression-bomb guard: {e})", p) from e
        except UnidentifiedImageError as e:
            raise DataError("not an image file, or a format PIL cannot identify", p) from e
        except MemoryError as e:
            raise DataError("not enough memory to decode the image", p) from e
        except Exception as e:  # noqa: BLE001 -- any decoder failure on hostile input becomes a DataError
            msg = str(e) or type(e).__name__
            if "truncated" in msg.lower():
                raise DataError(f"image file is truncated or corrupt (PIL: {msg})", p) from e
            raise DataError(f"cannot decode image ({type(e).__name__}: {msg})", p) from e


def load_image_url(url: str, alpha: str = "composite") -> np.ndarray:
    """Download ``url`` (:func:`~focus_detr.data.url_io.download_url`: timeout, size limit) and read it as
    :func:`load_image` does; the temporary file is removed afterwards. Errors name the URL, not the file."""
    import shutil

    path = download_url(url)
    try:
        return load_image(path, alpha=alpha)
    except DataError as e:
        raise DataError(e.reason, url) from None
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def to_rgb_array(obj: "Image.Image | np.ndarray | torch.Tensor | str | Path",
                 alpha: str = "composite") -> np.ndarray:
    """Turn an image into an ``[H, W, 3]`` uint8 RGB array (a new, writable array).

    Accepts:
        * a file path (``str`` / ``Path``): read with :func:`load_image`;
        * an ``http(s)://`` URL (``str``): downloaded to a temporary file (:func:`load_image_url`);
        * a PIL image of any mode (EXIF orientation applied, as :func:`load_image`);
        * a numpy array ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA), of dtype
          bool, uint8, any other integer type or float (scaled by the rules in the module docstring);
        * a torch tensor in torch's layout ``[H, W]`` or ``[C, H, W]`` with C in {1, 3, 4}, same dtypes.

    Raises:
        DataError: for other shapes, empty images and unsupported dtypes.
    """
    if isinstance(obj, str) and is_url(obj):  # before any Path(): it would collapse "//"
        return load_image_url(obj, alpha=alpha)
    if isinstance(obj, (str, Path)):
        return load_image(obj, alpha=alpha)
    if isinstance(obj, Image.Image):
        obj = _apply_exif_orientation(obj, None)
        return _pil_to_rgb(obj, alpha, None)
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.ndim == 3:
            if t.shape[0] not in (1, 3, 4):
                raise DataError(f"a 3-d tensor must be [C, H, W] with C in (1, 3, 4), got {tuple(t.shape)}",
                                item="tensor")
            t = t.permute(1, 2, 0)
        if t.dtype == torch.bfloat16:
            t = t.float()
        return to_rgb_array(t.numpy(), alpha)
    if not isinstance(obj, np.ndarray):
        raise DataError(f"cannot read an image from an object of type {type(obj).__name__}", item="input")

    arr = obj
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DataError(f"an image array must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                        f"got shape {tuple(obj.shape)}", item="array")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"image array is empty (shape {tuple(obj.shape)})", item="array")
    # Scale the colour channels; alpha is scaled the same way so it ends up in 0..255 too.
    u8 = _scale_to_uint8(arr, None)
    if u8.shape[2] == 1:
        return np.repeat(u8, 3, axis=2)
    if u8.shape[2] == 4:
        return _handle_alpha(u8, alpha, None)
    return np.array(u8, dtype=np.uint8, copy=True)


# --------------------------------------------------------------------------------------------------


def _apply_exif_orientation(img: Image.Image, path: Path | None) -> Image.Image:
    """Rotate/flip as the EXIF Orientation tag says (as detectron2 and every image viewer do).

    A corrupt EXIF block is not worth losing the image over: warn and keep the stored orientation.
    """
    try:
        out = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 -- broken EXIF metadata, the pixels are fine
        where = f"{path}: " if path is not None else ""
        warnings.warn(f"{where}ignoring unreadable EXIF orientation ({e})", DataWarning, stacklevel=3)
        return img
    return img if out is None else out


def _pil_to_rgb(img: Image.Image, alpha: str, path: Path | None) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8, copy=True)
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in img.info):
        return _handle_alpha(np.array(img.convert("RGBA"), dtype=np.uint8), alpha, path)
    if mode in _HIGH_DEPTH_MODES:
        arr = np.array(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        gray = _scale_to_uint8(arr, path)
        return np.repeat(gray, 3, axis=2) if gray.shape[2] == 1 else gray
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8, copy=True)
    except (ValueError, OSError) as e:
        raise DataError(f"cannot convert pixel mode {mode!r} to RGB ({e})", path) from e


def _handle_alpha(rgba: np.ndarray, alpha: str, path: Path | None) -> np.ndarray:
    """``[H, W, 4]`` uint8 -> ``[H, W, 3]`` uint8: composite over white, or drop the alpha channel."""
    if alpha == "drop":
        return np.array(rgba[:, :, :3], dtype=np.uint8, copy=True)
    if alpha != "composite":
        raise ValueError(f"alpha must be 'composite' or 'drop', got {alpha!r}")
    rgb = rgba[:, :, :3].astype(np.uint32)
    a = rgba[:, :, 3:4].astype(np.uint32)
    # Integer "over" operator with rounding: rgb * a/255 + 255 * (1 - a/255).
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _scale_to_uint8(arr: np.ndarray, path: Path | None) -> np.ndarray:
    """Map any numeric image array to uint8 by the rules in the module docstring (shape unchanged)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        m = int(arr.max()) if arr.size else 0
        if m <= 255:
            return np.clip(arr, 0, 255).astype(np.uint8)
        full = (1 << m.bit_length()) - 1  # the smallest all-ones value >= m: 4095 for 12-bit data, etc.
        a = arr.astype(np.float32)  # float32 (not int64/float64): 4 bytes per value on huge images
        np.maximum(a, 0.0, out=a)
        a *= np.float32(255.0 / full)
        return np.clip(np.rint(a, out=a), 0, 255).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float32)  # a copy: the caller's array is never modified
        a[~np.isfinite(a)] = 0.0
        np.maximum(a, 0.0, out=a)
        m = float(a.max()) if a.size else 0.0
        if m <= 1.0:
            a *= np.float32(255.0)
        elif m > 255.0:
            a *= np.float32(255.0 / m)
        return np.clip(np.rint(a, out=a), 0, 255).astype(np.uint8)
    raise DataError(f"unsupported image dtype {arr.dtype}", path, None if path is not None else "array")
