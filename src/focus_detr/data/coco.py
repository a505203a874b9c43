"""COCO-format detection datasets (any ``instances_*.json``), validated up front.

Annotation files are checked completely when the dataset is built, so a malformed record fails at once with
a :class:`~focus_detr.data.errors.DataError` naming the file and the record, instead of as a ``KeyError``
deep inside a DataLoader worker hours into training. Image files are read lazily in ``__getitem__``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import posixpath
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO

from focus_detr.data.errors import DataError, DataWarning
from focus_detr.data.image_io import load_image
from focus_detr.data.transforms import ImageLike, Target, clip_and_filter_boxes, image_hw

# Clipping a box to its image by less than this many pixels is float noise from the annotation tool
# (COCO has boxes ending at x + w = width + 1e-3): such boxes are clipped silently, without a count.
CLIP_TOLERANCE: float = 0.01

_FIXUP_KEYS = ("degenerate_boxes_dropped", "boxes_clipped", "boxes_outside_dropped", "bad_images_skipped")


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    boxes: np.ndarray   # float32 [n, 4], xyxy absolute pixels, clipped to (width, height)
    labels: np.ndarray  # int64 [n], contiguous labels


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset.

    Args:
        image_dir: folder the ``file_name`` entries of ``images`` are relative to.
        annotation_file: a COCO ``instances_*.json`` (needs ``images`` and ``categories``; ``annotations``
            may be absent, e.g. for test-dev ``image_info`` files, when ``filter_empty=False``).
        transforms: called as ``image, target = transforms(image, target)`` with an ``[H, W, 3]`` uint8
            RGB array and a target holding ``boxes`` / ``labels`` (see :mod:`focus_detr.data.transforms`);
            ``None`` for no transform.
        filter_empty: drop images without any usable (non-crowd, non-degenerate) box, as the official
            training set does (detectron2 ``filter_empty_annotations``). Use ``False`` for evaluation.
        skip_bad: when an image file is missing, unreadable or of a size different from the one in the
            json, warn, count it in ``fixups["bad_images_skipped"]`` and return the next readable item
            (index ``idx + 1``, wrapping around) instead of raising. The returned target always belongs to
            the returned image; an index known to be bad is not read again. With DataLoader workers each
            worker keeps its own count.
        class_names: fix the label space by name: label ``i`` is the category named ``class_names[i]``.
            Every category in the file must appear in it (a val file may hold a subset). ``None``: labels
            ``0..K-1`` follow the categories sorted by id, named by the file.
        category_to_label: fix the label space by category id instead (e.g. from
            :func:`~focus_detr.data.class_map.map_categories`): ``{category_id: label}``; annotations of
            categories left out are not used (counted in ``stats["unmapped_ignored"]``). Needs ``class_names``
            (the names of the labels).
        allow_outside_images: accept ``file_name`` entries that leave ``image_dir`` (absolute paths, ``..``).
            By default they are refused with a DataError: an annotation file must not make the reader open
            files elsewhere. The check is on the written name, so a symbolic link *inside* ``image_dir``
            (to a folder or file stored elsewhere) is followed as usual.
        read_annotations: returns the parsed annotation content (a COCO dict); default: read
            ``annotation_file`` as JSON. Used for the layouts converted in memory
            (:mod:`focus_detr.data.layouts`); ``annotation_file`` then only names the source in messages.

    Label mapping: ``category_id_to_label`` / ``label_to_category_id`` (dicts of ints), ``class_names``
    (tuple of str, indexed by label), ``num_classes``.

    ``__getitem__(i)`` returns ``(image, target)``:
        image: uint8 tensor ``[3, H, W]``, RGB, after transforms.
        target: ``boxes`` float32 ``[n, 4]`` xyxy absolute pixels in the transformed image (clipped to it,
        empty boxes dropped); ``labels`` int64 ``[n]``; ``image_id`` int; ``orig_size`` long ``[2]``
        ``(h, w)`` of the image file; ``size`` long ``[2]`` ``(h, w)`` after transforms.

    What is repaired instead of refused, each counted in ``dataset.fixups`` and reported by one
    :class:`~focus_detr.data.errors.DataWarning` per kind when the file is loaded:
        ``degenerate_boxes_dropped``: boxes with a non-finite coordinate or zero/negative width or height;
        ``boxes_clipped``: boxes reaching outside the image by more than ``CLIP_TOLERANCE`` px, clipped;
        ``boxes_outside_dropped``: boxes with no area left inside the image after clipping;
        ``bad_images_skipped``: image files skipped at ``__getitem__`` time (``skip_bad=True`` only).
    Crowd annotations (``iscrowd=1``) are ignored, as in the official pipeline (no warning; counted in
    ``dataset.stats["crowd_ignored"]``).

    What is refused with a DataError naming the file and the record: unreadable / non-JSON file, missing
    keys or wrong types, duplicate image / annotation / category ids, an annotation for an image or
    category id that does not exist, a category missing from ``class_names``, and an empty dataset.

    ``dataset.coco`` is a pycocotools ``COCO`` index of the *original* file (as detectron2's evaluator
    uses it), with ``area`` (box area) and ``iscrowd`` (0) filled in where missing because ``COCOeval``
    needs them; it is built on first access.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable[[ImageLike, Target], tuple[ImageLike, Target]] | None = None,
        filter_empty: bool = True,
        skip_bad: bool = False,
        class_names: Sequence[str] | None = None,
        category_to_label: Mapping[int, int] | None = None,
        allow_outside_images: bool = False,
        read_annotations: Callable[[], Any] | None = None,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.filter_empty = filter_empty
        self.skip_bad = skip_bad
        self.fixups: dict[str, int] = {k: 0 for k in _FIXUP_KEYS}
        self.stats: dict[str, int] = {}
        self._coco: COCO | None = None
        self._bad_indices: set[int] = set()
        self.allow_outside_images = allow_outside_images
        self._read_annotations = read_annotations

        data = self._read()
        images, annotations, categories = validate_top_level(data, self.annotation_file)
        self._set_categories(categories, class_names, category_to_label)
        self._records = self._build_records(images, annotations)

    # ----------------------------------------------------------------------------------------------
    # Loading and validation

    def _read(self) -> Any:
        if self._read_annotations is not None:
            return self._read_annotations()
        return read_json(self.annotation_file)

    def _set_categories(self, categories: list[dict[str, Any]], class_names: Sequence[str] | None,
                        category_to_label: Mapping[int, int] | None = None) -> None:
        path = self.annotation_file
        cats = validate_categories(categories, path)
        if category_to_label is not None:
            if class_names is None:
                raise ValueError("category_to_label needs class_names (the names of the labels)")
            self.class_names = tuple(str(n) for n in class_names)
            for cid, label in category_to_label.items():
                if cid not in cats:
                    raise DataError(f"category id {cid} is mapped but not in 'categories'", path)
                if not 0 <= int(label) < len(self.class_names):
                    raise DataError(f"category id {cid} is mapped to label {label}, outside 0..{len(self.class_names) - 1}",
                                    path)
            self.category_id_to_label = {int(c): int(v) for c, v in category_to_label.items()}
            self._all_category_ids = set(cats)
        elif class_names is None:
            sorted_ids = sorted(cats)
            self.class_names: tuple[str, ...] = tuple(cats[c] for c in sorted_ids)
            self.category_id_to_label: dict[int, int] = {c: i for i, c in enumerate(sorted_ids)}
        else:
            names = tuple(str(n) for n in class_names)
            if len(set(names)) != len(names):
                raise ValueError(f"class_names has duplicates: {names}")
            index = {n: i for i, n in enumerate(names)}
            by_name: dict[str, int] = {}
            self.category_id_to_label = {}
            for cid in sorted(cats):
                name = cats[cid]
                if name not in index:
                    raise DataError(f"category {name!r} is not in class_names {list(names)}", path,
                                    f"category id {cid}")
                if name in by_name:
                    raise DataError(f"category name {name!r} is also used by category id {by_name[name]}; "
                                    "names must be unique to map them onto class_names", path,
                                    f"category id {cid}")
                by_name[name] = cid
                self.category_id_to_label[cid] = index[name]
            self.class_names = names
        self._all_category_ids = set(cats)
        self.label_to_category_id: dict[int, int] = {v: k for k, v in self.category_id_to_label.items()}

    def _build_records(self, images: list[Any], annotations: list[Any]) -> list[_ImageRecord]:
        path = self.annotation_file
        image_meta: dict[int, tuple[str, int, int]] = {}
        order: list[int] = []
        for k, img in enumerate(images):
            where = f"images[{k}]"
            if not isinstance(img, dict):
                raise DataError(f"must be an object, got {type(img).__name__}", path, where)
            iid = _get_int(img, "id", path, where)
            where = f"image id {iid} ({where})"
            if iid in image_meta:
                raise DataError("duplicate image id", path, where)
            file_name = img.get("file_name")
            if not isinstance(file_name, str) or not file_name:
                raise DataError("missing or empty 'file_name'", path, where)
            if "\0" in file_name:
                raise DataError("'file_name' contains a NUL character", path, where)
            if not self.allow_outside_images and not _stays_inside(file_name):
                raise DataError(f"'file_name' {file_name!r} points outside the image folder {self.image_dir} "
                                "(pass --allow-outside-images, or allow_outside_images=True, if that is intended)",
                                path, where)
            height = _get_int(img, "height", path, where, allow_integral_float=True)
            width = _get_int(img, "width", path, where, allow_integral_float=True)
            if height <= 0 or width <= 0:
                raise DataError(f"non-positive size {width}x{height} (width x height)", path, where)
            image_meta[iid] = (file_name, height, width)
            order.append(iid)

        boxes: dict[int, list[list[float]]] = {iid: [] for iid in order}
        labels: dict[int, list[int]] = {iid: [] for iid in order}
        seen_ann: set[int] = set()
        examples: dict[str, list[int]] = {k: [] for k in _FIXUP_KEYS}
        crowd = 0
        unmapped = 0
        for k, ann in enumerate(annotations):
            where = f"annotations[{k}]"
            if not isinstance(ann, dict):
                raise DataError(f"must be an object, got {type(ann).__name__}", path, where)
            aid = _get_int(ann, "id", path, where)
            where = f"annotation id {aid} ({where})"
            if aid in seen_ann:
                raise DataError("duplicate annotation id", path, where)
            seen_ann.add(aid)
            iid = _get_int(ann, "image_id", path, where)
            cid = _get_int(ann, "category_id", path, where)
            bbox = ann.get("bbox")
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise DataError(f"'bbox' must be a list of 4 numbers [x, y, w, h], got {_short(bbox)}", path, where)
            x, y, w, h = (_to_float(v, "bbox", path, where) for v in bbox)
            if "area" in ann:
                if not _is_number(ann["area"]):
                    raise DataError(f"'area' must be a number, got {_short(ann['area'])}", path, where)
                _to_float(ann["area"], "area", path, where)
            iscrowd = ann.get("iscrowd", 0)
            if iscrowd not in (0, 1) or not isinstance(iscrowd, (int, bool)):
                raise DataError(f"'iscrowd' must be 0 or 1, got {iscrowd!r}", path, where)
            if iid not in image_meta:
                raise DataError(f"refers to image id {iid}, which is not in 'images'", path, where)
            if cid not in self._all_category_ids:
                raise DataError(f"unknown category id {cid} (known: {sorted(self._all_category_ids)})",
                                path, where)
            if cid not in self.category_id_to_label:
                unmapped += 1
                continue
            if iscrowd:
                crowd += 1
                continue
            _, height, width = image_meta[iid]
            if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
                self.fixups["degenerate_boxes_dropped"] += 1
                examples["degenerate_boxes_dropped"].append(aid)
                continue
            x0, y0, x1, y1 = x, y, x + w, y + h
            cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
            cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
            if cx1 - cx0 <= 0 or cy1 - cy0 <= 0:
                self.fixups["boxes_outside_dropped"] += 1
                examples["boxes_outside_dropped"].append(aid)
                continue
            if max(abs(cx0 - x0), abs(cy0 - y0), abs(cx1 - x1), abs(cy1 - y1)) > CLIP_TOLERANCE:
                self.fixups["boxes_clipped"] += 1
                examples["boxes_clipped"].append(aid)
            boxes[iid].append([cx0, cy0, cx1, cy1])
            labels[iid].append(self.category_id_to_label[cid])

        descriptions = {
            "degenerate_boxes_dropped": "dropped {n} degenerate box(es) (non-finite, zero or negative size)",
            "boxes_clipped": "clipped {n} box(es) reaching outside their image",
            "boxes_outside_dropped": "dropped {n} box(es) lying entirely outside their image",
        }
        for key, text in descriptions.items():
            n = self.fixups[key]
            if n:
                ids = ", ".join(str(a) for a in examples[key][:5]) + (", ..." if n > 5 else "")
                warnings.warn(f"{path}: {text.format(n=n)}: annotation ids {ids}", DataWarning, stacklevel=3)

        records = []
        no_boxes = 0
        for iid in order:
            file_name, height, width = image_meta[iid]
            if not boxes[iid]:
                no_boxes += 1
                if self.filter_empty:
                    continue
            records.append(_ImageRecord(
                image_id=iid, file_name=file_name, height=height, width=width,
                boxes=np.asarray(boxes[iid], dtype=np.float32).reshape(-1, 4),
                labels=np.asarray(labels[iid], dtype=np.int64).reshape(-1),
            ))
        self.stats = {
            "images_in_file": len(order),
            "annotations_in_file": len(annotations),
            "crowd_ignored": crowd,
            "unmapped_ignored": unmapped,
            "images_without_boxes": no_boxes,
            "images": len(records),
            "boxes": int(sum(len(r.labels) for r in records)),
        }
        if not records:
            why = (f" ({no_boxes} image(s) without usable boxes were filtered; pass filter_empty=False to "
                   "keep them)") if self.filter_empty and no_boxes else ""
            raise DataError(f"the dataset is empty{why}", path)
        return records

    # ----------------------------------------------------------------------------------------------
    # Dataset protocol

    def __len__(self) -> int:
        return len(self._records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_ids(self) -> list[int]:
        """COCO image ids of the items, in index order."""
        return [r.image_id for r in self._records]

    def get_image_info(self, idx: int) -> dict[str, Any]:
        """``{"id", "file_name", "path", "height", "width", "num_boxes"}`` of item ``idx`` from the json
        (no file access; ``height``/``width`` are the untransformed size, e.g. for aspect-ratio grouping)."""
        r = self._records[idx]
        return {"id": r.image_id, "file_name": r.file_name, "path": self.image_dir / r.file_name,
                "height": r.height, "width": r.width, "num_boxes": int(len(r.labels))}

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, Target]:
        n = len(self._records)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} out of range for a dataset of {n} images")
        idx = idx % n
        if not self.skip_bad:
            return self._load_item(idx)
        for step in range(n):
            j = (idx + step) % n
            if j in self._bad_indices:
                continue
            try:
                return self._load_item(j)
            except DataError as e:
                self._bad_indices.add(j)
                self.fixups["bad_images_skipped"] += 1
                warnings.warn(f"skipping unreadable item {j}: {e}", DataWarning, stacklevel=2)
        raise DataError("no readable image left in the dataset (every image file failed to load)",
                        self.annotation_file)

    def _load_item(self, idx: int) -> tuple[torch.Tensor, Target]:
        rec = self._records[idx]
        path = self.image_dir / rec.file_name
        image = load_image(path)
        h, w = int(image.shape[0]), int(image.shape[1])
        if (h, w) != (rec.height, rec.width):
            hint = (" (width and height swapped: the file probably has an EXIF rotation that the annotation "
                    "tool ignored)") if (h, w) == (rec.width, rec.height) else ""
            raise DataError(f"image is {w}x{h} (width x height) but the annotation file says "
                            f"{rec.width}x{rec.height}{hint}; its boxes would be misplaced", path,
                            f"image id {rec.image_id}")
        target: Target = {
            "boxes": torch.from_numpy(rec.boxes.copy()),
            "labels": torch.from_numpy(rec.labels.copy()),
            "image_id": rec.image_id,
            "orig_size": torch.tensor([h, w], dtype=torch.long),
        }
        out_image: ImageLike = image
        if self.transforms is not None:
            out_image, target = self.transforms(image, target)
        arr = np.asarray(out_image, dtype=np.uint8)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise DataError(f"transforms returned an image of shape {arr.shape}, expected [H, W, 3]", path)
        th, tw = image_hw(out_image)
        # Boxes may leave the image after a transform (or be emptied); clip and filter as detectron2 does.
        target = clip_and_filter_boxes(target, th, tw)
        target["boxes"] = target["boxes"].to(torch.float32).reshape(-1, 4)
        target["labels"] = target["labels"].to(torch.int64).reshape(-1)
        target["size"] = torch.tensor([th, tw], dtype=torch.long)
        tensor = torch.from_numpy(arr.transpose(2, 0, 1).copy())  # copy: contiguous and writable
        return tensor, target

    # ----------------------------------------------------------------------------------------------
    # Evaluation support

    @property
    def coco(self) -> COCO:
        """pycocotools index of the original annotation file (see the class docstring)."""
        if self._coco is None:
            data = self._read()
            for ann in data.get("annotations", []):
                # validated in __init__: every value converts to a float (a 400-digit integer would not)
                ann["bbox"] = [float(v) for v in ann["bbox"]]
                ann["area"] = float(ann["area"]) if "area" in ann else ann["bbox"][2] * ann["bbox"][3]
                ann.setdefault("iscrowd", 0)
            data.setdefault("annotations", [])
            coco = COCO()
            coco.dataset = data
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
                coco.createIndex()
            self._coco = coco
        return self._coco

    def __getstate__(self) -> dict[str, Any]:
        # Do not ship the (possibly large) COCO index to DataLoader workers; it is rebuilt on demand.
        state = dict(self.__dict__)
        state["_coco"] = None
        return state


# --------------------------------------------------------------------------------------------------
# Helpers


def read_json(path: Path) -> Any:
    """The parsed content of an annotation file; any failure is a :class:`DataError` naming it."""
    path = Path(path)
    if not path.exists():
        raise DataError("annotation file not found", path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read annotation file ({e})", path) from e
    if not raw.strip():
        raise DataError("annotation file is empty", path)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"not valid JSON ({e})", path) from None
    except RecursionError:
        raise DataError("not a usable annotation file: arrays/objects nested too deeply", path) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits (Python's int parsing limit)
        raise DataError(f"not a usable annotation file ({str(e).splitlines()[0][:200]})", path) from None


_read_json = read_json  # the old private name


def _stays_inside(file_name: str) -> bool:
    """Whether ``file_name``, taken relative to the image folder, stays in it (by its written form: no
    absolute path, drive letter, or ``..`` leading out)."""
    name = file_name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return False
    normal = posixpath.normpath(name)
    return normal != ".." and not normal.startswith("../")


def _short(value: Any, limit: int = 80) -> str:
    if isinstance(value, int) and abs(value) >= 10 ** 30:
        return f"<integer of about {int(value.bit_length() * 0.30103) + 1} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _to_float(value: Any, key: str, path: Path, where: str) -> float:
    try:
        return float(value)
    except OverflowError:
        raise DataError(f"{key!r} holds a number outside the floating-point range ({_short(value)})",
                        path, where) from None


def validate_categories(categories: list[Any], path: Path) -> dict[int, str]:
    """``{category id: name}`` of a ``categories`` list, checked (DataError naming the record)."""
    cats: dict[int, str] = {}
    for k, cat in enumerate(categories):
        where = f"categories[{k}]"
        if not isinstance(cat, dict):
            raise DataError(f"must be an object, got {type(cat).__name__}", path, where)
        cid = _get_int(cat, "id", path, where)
        where = f"category id {cid} ({where})"
        name = cat.get("name")
        if not isinstance(name, str):
            raise DataError("missing or non-string 'name'", path, where)
        if cid in cats:
            raise DataError("duplicate category id", path, where)
        cats[cid] = name
    if not cats:
        raise DataError("'categories' is empty: there is no class to detect", path)
    return cats


def validate_top_level(data: Any, path: Path) -> tuple[list[Any], list[Any], list[Any]]:
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object with 'images', 'annotations', 'categories', "
                        f"got {type(data).__name__}", path)
    for key in ("images", "categories"):
        if key not in data:
            raise DataError(f"missing top-level key {key!r}", path)
    annotations = data.get("annotations", [])
    for key, value in (("images", data["images"]), ("annotations", annotations),
                       ("categories", data["categories"])):
        if not isinstance(value, list):
            raise DataError(f"top-level {key!r} must be a list, got {type(value).__name__}", path)
    return data["images"], annotations, data["categories"]


def _is_number(v: Any) -> bool:
    # bool is an int subclass in Python; a boolean coordinate is a malformed file, not 0/1.
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _get_int(d: dict[str, Any], key: str, path: Path, where: str, allow_integral_float: bool = False) -> int:
    if key not in d:
        raise DataError(f"missing key {key!r}", path, where)
    v = d[key]
    if isinstance(v, int) and not isinstance(v, bool):
        if not -(2 ** 63) <= v < 2 ** 63:
            raise DataError(f"{key!r} is outside the 64-bit integer range ({_short(v)})", path, where)
        return v
    if allow_integral_float and isinstance(v, float) and v.is_integer():
        if not -(2.0 ** 63) <= v < 2.0 ** 63:
            raise DataError(f"{key!r} is outside the 64-bit integer range ({v!r})", path, where)
        return int(v)
    raise DataError(f"{key!r} must be an integer, got {_short(v)}", path, where)

