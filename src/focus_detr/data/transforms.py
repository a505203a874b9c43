"""Detection augmentations that keep boxes consistent with the image (detectron2 / detrex semantics).

Every transform is called as ``image, target = t(image, target, rng)`` where

* ``image`` is a PIL RGB image or an ``[H, W, 3]`` uint8 numpy array; the same type is returned;
* ``target`` is a dict holding at least ``"boxes"``: float32 tensor ``[n, 4]``, absolute-pixel ``xyxy`` in
  the image's coordinate frame, and ``"labels"``: int64 tensor ``[n]``. Other per-instance tensors listed in
  :data:`INSTANCE_KEYS` are filtered together with the boxes; every other entry is passed through. The
  input dict is never modified (a transform that changes nothing may return it as is).
* ``rng`` is a :class:`random.Random` to draw from, or ``None`` for Python's global ``random`` module.
  The global default is deliberate: PyTorch's DataLoader reseeds ``random`` in every worker (from the
  engine's base seed), so augmentations differ across workers and are reproducible, whereas an RNG object
  stored in a transform would be copied into every worker and repeat the same augmentations there.

Random draws use Python's RNG rather than numpy's, so the sampled *distributions* match detectron2 but the
exact streams do not.

The official training list (NR ``detr_dataset_mapper.py`` with DX ``configs/common/data/coco_detr.py``) is
``RandomHorizontalFlip -> ResizeShortestEdge(480..800 step 32, max 1333)``; the upstream detrex mapper picks,
with p = 0.5, that list or ``Flip -> Resize{400,500,600} -> RandomCrop(absolute_range 384..600) ->
Resize(480..800, max 1333)``. :func:`build_train_transforms` builds both (``crop=False`` / ``crop=True``).
"""

from __future__ import annotations

import random
import sys
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

from focus_detr.ops.images import resized_shape

ImageLike = Image.Image | np.ndarray
Target = dict[str, Any]

# Per-instance entries of a target: filtered together with ``boxes`` when instances are dropped.
INSTANCE_KEYS: tuple[str, ...] = ("boxes", "labels", "area", "iscrowd")

# detectron2's ``filter_empty_instances`` keeps boxes whose width and height exceed this (pixels).
EMPTY_BOX_THRESHOLD: float = 1e-5


class Transform(Protocol):
    def __call__(self, image: ImageLike, target: Target,
                 rng: random.Random | None = None) -> tuple[ImageLike, Target]: ...


def image_hw(image: ImageLike) -> tuple[int, int]:
    """``(height, width)`` of a PIL image or ``[H, W, C]`` array."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    return int(image.shape[0]), int(image.shape[1])


def _rng(rng: random.Random | None) -> Any:
    # The ``random`` module exposes the same methods as a ``random.Random`` instance (its hidden global one).
    return random if rng is None else rng


def filter_instances(target: Target, keep: torch.Tensor) -> Target:
    """Return a copy of ``target`` keeping instances where the bool ``[n]`` mask ``keep`` is True."""
    out = dict(target)
    for key in INSTANCE_KEYS:
        if key in out and isinstance(out[key], torch.Tensor):
            out[key] = out[key][keep]
    return out


def clip_and_filter_boxes(target: Target, height: int, width: int) -> Target:
    """Clip ``target["boxes"]`` to the ``height x width`` image and drop boxes left (near-)empty.

    This is detectron2's ``transform_instance_annotations`` clipping followed by ``filter_empty_instances``.
    """
    boxes = target["boxes"]
    if boxes.numel() == 0:
        return dict(target)
    clipped = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                           boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    keep = ((clipped[:, 2] - clipped[:, 0]) > EMPTY_BOX_THRESHOLD) & \
           ((clipped[:, 3] - clipped[:, 1]) > EMPTY_BOX_THRESHOLD)
    out = dict(target)
    out["boxes"] = clipped
    return filter_instances(out, keep)


class Compose:
    """Apply transforms in order, threading the same ``rng`` through them."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target,
                 rng: random.Random | None = None) -> tuple[ImageLike, Target]:
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class RandomChoice:
    """Apply one of several transforms, chosen with probabilities ``p`` (uniform when ``None``).

    detrex's mapper draws ``np.random.rand() > 0.5`` to pick the plain list over the crop list; with two
    transforms and ``p=None`` this is the same 50/50 choice.
    """

    def __init__(self, transforms: Sequence[Transform], p: Sequence[float] | None = None) -> None:
        if len(transforms) == 0:
            raise ValueError("RandomChoice needs at least one transform")
        if p is not None:
            if len(p) != len(transforms) or any(q < 0 for q in p) or sum(p) <= 0:
                raise ValueError(f"p must give one non-negative weight per transform, got {p}")
        self.transforms = list(transforms)
        self.p = None if p is None else [float(q) for q in p]

    def __call__(self, image: ImageLike, target: Target,
                 rng: random.Random | None = None) -> tuple[ImageLike, Target]:
        r = _rng(rng)
        if self.p is None:
            t = self.transforms[r.randrange(len(self.transforms))]
        else:
            t = r.choices(self.transforms, weights=self.p, k=1)[0]
        return t(image, target, rng)

    def __repr__(self) -> str:
        return f"RandomChoice({self.transforms!r}, p={self.p})"


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p``; box ``x`` becomes ``width - x`` (detectron2 ``HFlip``)."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: ImageLike, target: Target,
                 rng: random.Random | None = None) -> tuple[ImageLike, Target]:
        if _rng(rng).random() >= self.p:
            return image, target
        return hflip(image, target)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def hflip(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Deterministic horizontal flip of the image and its boxes."""
    _, w = image_hw(image)
    if isinstance(image, Image.Image):
        out_image: ImageLike = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        out_image = np.ascontiguousarray(image[:, ::-1])
    out = dict(target)
    boxes = target["boxes"]
    if boxes.numel() > 0:
        # [x0, y0, x1, y1] -> [w - x1, y0, w - x0, y1]: the corners swap so the box stays x0 <= x1.
        out["boxes"] = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    return out_image, out


class ResizeShortestEdge:
    """Resize so the short side is one of ``short_sizes`` while the long side stays <= ``max_size``.

    The detectron2 rule (:meth:`get_output_shape`): ``scale = s / min(h, w)``; if the long side would exceed
    ``max_size`` the image is scaled so the long side is exactly ``max_size``; sizes are rounded with
    ``int(x + 0.5)``. Resampling is PIL bilinear, as detectron2 does for uint8 images. Boxes are scaled by
    ``(new_w / w, new_h / h)``. Output sizes are clamped to >= 1 px so extreme aspect ratios (1 x 20000)
    still give a valid image.

    Args:
        short_sizes: candidate short-side lengths (pixels). An int means a single size.
        max_size: cap on the long side (detectron2's default ``sys.maxsize`` means no cap).
        sample: ``"choice"`` picks one of ``short_sizes`` uniformly; ``"range"`` draws an integer uniformly
            in ``[min(short_sizes), max(short_sizes)]`` (detectron2's ``sample_style``).
    """

    def __init__(self, short_sizes: Sequence[int] | int, max_size: int = sys.maxsize,
                 sample: str = "choice") -> None:
        sizes = (short_sizes,) if isinstance(short_sizes, int) else tuple(int(s) for s in short_sizes)
        if len(sizes) == 0 or any(s <= 0 for s in sizes):
            raise ValueError(f"short_sizes must be positive integers, got {short_sizes}")
        if max_size <= 0:
            raise ValueError(f"max_size must be positive, got {max_size}")
        if sample not in ("choice", "range"):
            raise ValueError(f"sample must be 'choice' or 'range', got {sample!r}")
        if sample == "range" and len(sizes) != 2:
            raise ValueError(f"sample='range' needs (min, max) short sizes, got {sizes}")
        self.short_sizes = sizes
        self.max_size = int(max_size)
        self.sample = sample

    @staticmethod
    def get_output_shape(height: int, width: int, short: int, max_size: int) -> tuple[int, int]:
        """``(new_h, new_w)`` for an ``height x width`` image: :func:`focus_detr.ops.images.resized_shape`,
        the one resize rule that prediction, the ONNX runner and video frames use too."""
        return resized_shape(height, width, short, max_size)

    def __call__(self, image: ImageLike, target: Target,
                 rng: random.Random | None = None) -> tuple[ImageLike, Target]:
        r = _rng(rng)
        if self.sample == "choice":
            short = self.short_sizes[0] if len(self.short_sizes) == 1 else r.choice(self.short_sizes)
        else:
            short = r.randint(min(self.short_sizes), max(self.short_sizes))
        h, w = image_hw(image)
        new_h, new_w = self.get_output_shape(h, w, short, self.max_size)
        return resize(image, target, new_h, new_w)

    def __repr__(self) -> str:
        return f"ResizeShortestEdge(short_sizes={self.short_sizes}, max_size={self.max_size}, sample={self.sample!r})"


def resize(image: ImageLike, target: Target, new_h: int, new_w: int) -> tuple[ImageLike, Target]:
    """Resize the image to ``new_h x new_w`` (PIL bilinear) and scale the boxes accordingly."""
    h, w = image_hw(image)
    if (new_h, new_w) == (h, w):
        return image, target
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    out_image: ImageLike = pil if isinstance(image, Image.Image) else np.array(pil, dtype=np.uint8)
    out = dict(target)
    boxes = target["boxes"]
    if boxes.numel() > 0:
        scale = torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h], dtype=boxes.dtype)
        out["boxes"] = boxes * scale
    return out_image, out


class RandomCrop:
    """Crop a random window whose height and width are each drawn in ``[min_size, max_size]`` pixels.

    detectron2 ``RandomCrop(crop_type="absolute_range", crop_size=(min_size, max_size))``:
    ``crop_h ~ U{min(h, min_size) .. min(h, max_size)}`` (likewise ``crop_w``), so an image smaller than the
    range is cropped to at most its own size; the window's top-left corner is uniform over valid positions.
    Boxes are shifted, clipped to the window, and those left empty are dropped (with their labels).
    """

    def __init__(self, min_size: int = 384, max_size: int = 600) -> None:
        if not 0 < min_size <= max_size:
            raise ValueError(f"need 0 < min_size <= max_size, got ({min_size}, {max_size})")
        self.min_size = int(min_size)
        self.max_size = int(max_size)

    def __call__(self, image: ImageLike, target: Target,
                 rng: random.Random | None = None) -> tuple[ImageLike, Target]:
        r = _rng(rng)
        h, w = image_hw(image)
        crop_h = r.randint(min(h, self.min_size), min(h, self.max_size))
        crop_w = r.randint(min(w, self.min_size), min(w, self.max_size))
        y0 = r.randint(0, h - crop_h)
        x0 = r.randint(0, w - crop_w)
        return crop(image, target, y0, x0, crop_h, crop_w)

    def __repr__(self) -> str:
        return f"RandomCrop(min_size={self.min_size}, max_size={self.max_size})"


def crop(image: ImageLike, target: Target, top: int, left: int, height: int,
         width: int) -> tuple[ImageLike, Target]:
    """Cut the window ``[top, top + height) x [left, left + width)``; clip boxes to it, drop emptied ones."""
    if isinstance(image, Image.Image):
        out_image: ImageLike = image.crop((left, top, left + width, top + height))
    else:
        out_image = np.ascontiguousarray(image[top:top + height, left:left + width])
    out = dict(target)
    boxes = target["boxes"]
    if boxes.numel() > 0:
        out["boxes"] = boxes - torch.tensor([left, top, left, top], dtype=boxes.dtype)
    return out_image, clip_and_filter_boxes(out, height, width)


DEFAULT_TRAIN_SCALES: tuple[int, ...] = tuple(range(480, 801, 32))  # 480, 512, ..., 800


def build_train_transforms(
    scales: Sequence[int] = DEFAULT_TRAIN_SCALES,
    max_size: int = 1333,
    crop: bool = False,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size_range: tuple[int, int] = (384, 600),
    flip_p: float = 0.5,
) -> Compose | RandomChoice:
    """The training augmentation.

    ``crop=False`` (the official Focus-DETR behaviour): flip -> multi-scale ``ResizeShortestEdge(scales,
    max_size)``. ``crop=True`` (upstream detrex): with p = 0.5 that list, otherwise flip ->
    ``ResizeShortestEdge(crop_resize_sizes)`` (no long-side cap, as detrex) -> ``RandomCrop(*crop_size_range)``
    -> ``ResizeShortestEdge(scales, max_size)``. For small images (e.g. the synthetic dataset) pass scaled-down
    ``scales`` / ``crop_resize_sizes`` / ``crop_size_range``.
    """
    plain = Compose([RandomHorizontalFlip(flip_p), ResizeShortestEdge(tuple(scales), max_size)])
    if not crop:
        return plain
    with_crop = Compose([
        RandomHorizontalFlip(flip_p),
        ResizeShortestEdge(tuple(crop_resize_sizes)),
        RandomCrop(crop_size_range[0], crop_size_range[1]),
        ResizeShortestEdge(tuple(scales), max_size),
    ])
    return RandomChoice([plain, with_crop])


def build_test_transforms(short: int = 800, max_size: int = 1333) -> Compose:
    """Test-time resize: ``ResizeShortestEdge(short, max_size)`` (deterministic)."""
    return Compose([ResizeShortestEdge((short,), max_size)])
