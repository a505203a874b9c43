"""Where a dataset split's images and labels are: the folder layouts ``train`` / ``eval`` recognise.

Every layout is read into one in-memory COCO dict (``images`` / ``annotations`` / ``categories``), which
:class:`~focus_detr.data.CocoDetection` validates and serves, so all formats get the same checks, fix-ups
and evaluation. Detection of a ``--data`` folder tries, in this order (:data:`ACCEPTED_LAYOUTS` shows the trees):

1. COCO:            ``annotations/instances_{split}.json`` + ``images/{split}/``;
2. Roboflow COCO:   ``{split}/_annotations.coco.json`` with the images beside it (``val`` is also found as
   ``valid`` / ``validation``);
3. YOLO:            ``data.yaml`` naming the classes and the image folder of each split; labels in the
   matching ``labels`` folder (Ultralytics' rule: ``images`` -> ``labels`` in the path);
4. Pascal VOC:      ``Annotations/*.xml`` + ``JPEGImages/`` (+ ``ImageSets/Main/{split}.txt``).

Reading YOLO labels uses ``supervision`` (optional extra ``focus-detr[formats]``): it parses ``data.yaml``'s
class names in list or dict form, whole-number class ids written as floats, segment and pose lines (their
bounding box is used) and takes image sizes from file headers with the EXIF rotation applied, as our image
reader does. Pascal VOC is read by the short parser below instead, because supervision's reader ignores
``<difficult>`` (difficult objects would become ordinary targets and ordinary misses) and decodes every
image to learn its size, where the xml already holds it.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from focus_detr.data.errors import DataError

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Other names the same split goes by in exports (Roboflow writes "valid").
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {"val": ("val", "valid", "validation"),
                                             "valid": ("valid", "val", "validation"),
                                             "validation": ("validation", "val", "valid")}

ACCEPTED_LAYOUTS = """\
accepted dataset layouts (SPLIT is train, val, ...):
  COCO                            Roboflow COCO export
    DATA/annotations/               DATA/train/_annotations.coco.json
      instances_SPLIT.json          DATA/train/*.jpg
    DATA/images/SPLIT/*.jpg         DATA/valid/_annotations.coco.json  (val = valid)
  YOLO (Ultralytics, Roboflow)    Pascal VOC
    DATA/data.yaml                  DATA/Annotations/*.xml
      (names: [...], train: ..,     DATA/JPEGImages/*.jpg
       val: ..)                     DATA/ImageSets/Main/SPLIT.txt (optional: without it all is train)
    DATA/images/SPLIT/*.jpg
    DATA/labels/SPLIT/*.txt       or any COCO json: --train-json FILE --train-images DIR (eval: --json, --images)"""


def split_names(split: str) -> tuple[str, ...]:
    """``split`` and the other names exports use for it."""
    return SPLIT_ALIASES.get(split, (split,))


@dataclass(frozen=True)
class CocoJsonSplit:
    """A split described by a COCO json (``file_name`` relative to ``image_dir``)."""

    annotation_file: Path
    image_dir: Path
    layout: str = "COCO"

    @property
    def source(self) -> Path:
        """The file or folder named in messages about the labels."""
        return self.annotation_file

    def read(self) -> Any:
        from focus_detr.data.coco import read_json
        return read_json(self.annotation_file)


@dataclass(frozen=True)
class YoloSplit:
    """A YOLO split: ``data.yaml`` (class names), an image folder and its label folder (one ``.txt`` per
    image, lines ``class x_center y_center width height`` relative to the image size)."""

    data_yaml: Path
    image_dir: Path
    label_dir: Path
    layout: str = "YOLO"

    @property
    def source(self) -> Path:
        return self.label_dir

    def read(self) -> dict[str, Any]:
        sv = _import_supervision("YOLO")
        try:
            dataset = sv.DetectionDataset.from_yolo(str(self.image_dir), str(self.label_dir), str(self.data_yaml))
        except (ValueError, OSError, TypeError, KeyError) as e:
            raise DataError(f"cannot read the YOLO dataset ({_first_line(e)})", self.label_dir) from None
        except Exception as e:  # yaml errors and the like: one line naming the file, never a traceback
            raise DataError(f"cannot read ({type(e).__name__}: {_first_line(e)})", self.data_yaml) from None
        names = [str(n) for n in dataset.classes]
        images, annotations = [], []
        for image_id, (path, detections) in enumerate(sorted(dataset.annotations.items()), start=1):
            width, height = image_size(Path(path))
            images.append({"id": image_id, "file_name": Path(path).relative_to(self.image_dir).as_posix(),
                           "width": width, "height": height})
            label_file = self.label_dir / (Path(path).stem + ".txt")
            for box, class_id in zip(detections.xyxy.tolist(), detections.class_id.tolist()):
                if not 0 <= int(class_id) < len(names):
                    raise DataError(f"class id {class_id} is not one of the {len(names)} classes of "
                                    f"{self.data_yaml.name} (0..{len(names) - 1})", label_file)
                x0, y0, x1, y1 = (float(v) for v in box)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(class_id),
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "iscrowd": 0})
        # Category id = YOLO class id, so predictions.json speaks the dataset's own ids.
        categories = [{"id": k, "name": name} for k, name in enumerate(names)]
        return {"images": images, "annotations": annotations, "categories": categories}


@dataclass(frozen=True)
class VocSplit:
    """A Pascal VOC split: one xml per image in ``annotation_dir``; ``ids`` (file stems, from
    ``ImageSets/Main/SPLIT.txt``) selects the split, ``None`` = every xml. Class names are collected from
    every xml of the folder (not just the split) and sorted, so all splits share one label space."""

    annotation_dir: Path
    image_dir: Path
    ids: tuple[str, ...] | None = None
    layout: str = "Pascal VOC"

    @property
    def source(self) -> Path:
        return self.annotation_dir

    def read(self) -> dict[str, Any]:
        files = sorted(self.annotation_dir.glob("*.xml"))
        parsed = {f.stem: _parse_voc_xml(f) for f in files}
        names = sorted({obj["name"] for rec in parsed.values() for obj in rec["objects"]})
        if not names:
            raise DataError("no <object> in any annotation file: there is no class to detect", self.annotation_dir)
        category = {name: k for k, name in enumerate(names)}
        stems = list(self.ids) if self.ids is not None else list(parsed)
        images, annotations = [], []
        for image_id, stem in enumerate(stems, start=1):
            if stem not in parsed:
                raise DataError(f"image set lists {stem!r} but there is no {stem}.xml", self.annotation_dir)
            rec = parsed[stem]
            image_path = self._image_path(stem, rec["filename"])
            width, height = rec["size"] if rec["size"] else image_size(image_path)
            images.append({"id": image_id, "file_name": image_path.relative_to(self.image_dir).as_posix(),
                           "width": width, "height": height})
            for obj in rec["objects"]:
                x0, y0, x1, y1 = obj["box"]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": category[obj["name"]], "bbox": [x0, y0, x1 - x0, y1 - y0],
                                    "area": max(x1 - x0, 0.0) * max(y1 - y0, 0.0),
                                    # difficult objects are ignored in training and evaluation, as VOC does
                                    "iscrowd": int(obj["difficult"])})
        categories = [{"id": k, "name": name} for k, name in enumerate(names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def _image_path(self, stem: str, filename: str | None) -> Path:
        if filename and "/" not in filename and "\\" not in filename and (self.image_dir / filename).is_file():
            return self.image_dir / filename
        for ext in IMAGE_EXTENSIONS:
            for candidate in (self.image_dir / (stem + ext), self.image_dir / (stem + ext.upper())):
                if candidate.is_file():
                    return candidate
        raise DataError(f"no image for {stem}.xml in {self.image_dir} (tried {filename or stem + '.jpg'})",
                        self.annotation_dir / f"{stem}.xml")


DatasetSplit = CocoJsonSplit | YoloSplit | VocSplit


# --------------------------------------------------------------------------------------------------
# Finding a split


def find_split(data_dir: str | Path | None, split: str, annotation_file: str | Path | None = None,
               image_dir: str | Path | None = None) -> DatasetSplit | None:
    """The split ``split`` of ``data_dir``, or of an explicit COCO json, or ``None`` when the detected layout
    has no such split.

    ``annotation_file`` (+ ``image_dir``, default: the json's folder) takes precedence over ``data_dir``.
    Raises :class:`DataError` (with :data:`ACCEPTED_LAYOUTS`) when ``data_dir`` matches no layout at all.
    """
    if annotation_file is not None:
        ann = Path(annotation_file)
        if not ann.is_file():
            raise DataError("annotation file not found", ann)
        images = Path(image_dir) if image_dir is not None else ann.parent
        if not images.is_dir():
            raise DataError("image folder not found", images)
        return CocoJsonSplit(ann, images, layout="COCO json")
    if image_dir is not None:
        raise DataError("an image folder needs its annotation json (--train-json / --val-json / --json)", image_dir)
    if data_dir is None:
        raise DataError("no dataset given: pass --data DIR or an annotation json")
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError("dataset folder not found", root)

    if (root / "annotations").is_dir() and any((root / "annotations").glob("instances_*.json")):
        for name in split_names(split):
            ann = root / "annotations" / f"instances_{name}.json"
            if ann.is_file():
                return CocoJsonSplit(ann, root / "images" / name)
        return None
    roboflow = [d for d in sorted(root.iterdir()) if (d / "_annotations.coco.json").is_file()] \
        if not (root / "data.yaml").is_file() else []
    if roboflow:
        for name in split_names(split):
            ann = root / name / "_annotations.coco.json"
            if ann.is_file():
                return CocoJsonSplit(ann, ann.parent, layout="Roboflow COCO")
        return None
    for yaml_name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (root / yaml_name).is_file():
            return _find_yolo_split(root / yaml_name, split)
    voc = _voc_root(root)
    if voc is not None:
        return _find_voc_split(voc, split)
    raise DataError(f"no dataset layout recognised\n{ACCEPTED_LAYOUTS}", root)


def require_split(data_dir: str | Path | None, split: str, annotation_file: str | Path | None = None,
                  image_dir: str | Path | None = None) -> DatasetSplit:
    """:func:`find_split` that raises a :class:`DataError` naming what is missing instead of returning None."""
    found = find_split(data_dir, split, annotation_file, image_dir)
    if found is None:
        raise DataError(f"the dataset has no split {split!r} (looked for {' / '.join(split_names(split))} in its "
                        "layout; see docs/training.md#dataset-layouts)", data_dir)
    return found


def _find_yolo_split(data_yaml: Path, split: str) -> YoloSplit | None:
    config = _read_yaml(data_yaml)
    root = data_yaml.parent
    if isinstance(config.get("path"), str) and config["path"]:
        base = Path(config["path"])
        base = base if base.is_absolute() else root / base
        root = base if base.is_dir() else root  # a 'path' from another machine: fall back to the yaml's folder
    image_dir = None
    for name in split_names(split):
        entry = config.get(name)
        if entry is None:
            continue
        if not isinstance(entry, str) or entry.endswith(".txt"):
            raise DataError(f"{name!r} must be one image folder (lists and .txt file lists are not supported; "
                            "point --train-json/--train-images at a COCO export instead)", data_yaml)
        image_dir = _first_existing_dir(root, entry)
        if image_dir is None:
            raise DataError(f"{name}: image folder {entry!r} not found (relative to {root})", data_yaml)
        break
    if image_dir is None:
        # Without the key, the conventional folders (what Ultralytics and Roboflow write).
        for name in split_names(split):
            for candidate in (root / "images" / name, root / name / "images"):
                if candidate.is_dir():
                    image_dir = candidate
                    break
            if image_dir is not None:
                break
    if image_dir is None:
        return None
    label_dir = _labels_for(image_dir)
    if not label_dir.is_dir():
        raise DataError(f"no label folder {label_dir} for the images in {image_dir}", data_yaml)
    return YoloSplit(data_yaml, image_dir, label_dir)


def _first_existing_dir(root: Path, entry: str) -> Path | None:
    # Roboflow's data.yaml says '../train/images' relative to a folder below the yaml; accept the entry as
    # written, relative to the root, and with leading '../' removed.
    entry_path = Path(entry)
    candidates = [entry_path] if entry_path.is_absolute() else [root / entry_path]
    parts = entry_path.parts
    while parts and parts[0] == "..":
        parts = parts[1:]
        candidates.append(root.joinpath(*parts) if parts else root)
    return next((c for c in candidates if c.is_dir()), None)


def _labels_for(image_dir: Path) -> Path:
    # Ultralytics: the last 'images' component of the path becomes 'labels'.
    parts = list(image_dir.parts)
    for k in range(len(parts) - 1, -1, -1):
        if parts[k] == "images":
            parts[k] = "labels"
            return Path(*parts)
    return image_dir.parent / "labels"


def _voc_root(root: Path) -> Path | None:
    if (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        return root
    # VOCdevkit/VOC2007 or a single VOC folder inside DATA
    for sub in sorted(list(root.glob("VOC*")) + list(root.glob("VOCdevkit/VOC*"))):
        if (sub / "Annotations").is_dir() and (sub / "JPEGImages").is_dir():
            return sub
    return None


def _find_voc_split(voc: Path, split: str) -> VocSplit | None:
    sets = voc / "ImageSets" / "Main"
    if sets.is_dir() and any(sets.glob("*.txt")):
        for name in split_names(split):
            listing = sets / f"{name}.txt"
            if listing.is_file():
                ids = tuple(line.split()[0] for line in _read_text(listing).splitlines() if line.strip())
                return VocSplit(voc / "Annotations", voc / "JPEGImages", ids)
        return None
    return VocSplit(voc / "Annotations", voc / "JPEGImages") if split == "train" else None


# --------------------------------------------------------------------------------------------------
# Readers


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file from its header, after the EXIF rotation (as ``load_image``)."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read the image header ({_first_line(e)})", path) from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


_DTD = re.compile(rb"<!(DOCTYPE|ENTITY)", re.IGNORECASE)
MAX_XML_BYTES = 16 * 1024 * 1024


def _parse_voc_xml(path: Path) -> dict[str, Any]:
    """``{"filename", "size": (w, h) or None, "objects": [{"name", "box": (x0, y0, x1, y1), "difficult"}]}``.

    Boxes are converted from VOC's 1-based inclusive pixel indices to continuous coordinates
    (``xmin - 1, ymin - 1, xmax, ymax``, as detectron2 and supervision do).
    """
    import xml.etree.ElementTree as ET

    raw = _read_bytes(path, MAX_XML_BYTES)
    if _DTD.search(raw):  # entity definitions are never needed by VOC and are how xml bombs work
        raise DataError("DOCTYPE/ENTITY declarations are not accepted in annotation files", path)
    try:
        root = ET.fromstring(raw)
    except (ET.ParseError, RecursionError) as e:
        raise DataError(f"not valid XML ({_first_line(e)})", path) from None

    def text(node, tag: str) -> str | None:
        child = node.find(tag)
        return child.text.strip() if child is not None and child.text is not None else None

    def number(node, tag: str, where: str) -> float:
        value = text(node, tag)
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise DataError(f"<{tag}> must be a number, got {value!r}", path, where) from None

    size = None
    size_node = root.find("size")
    if size_node is not None and text(size_node, "width") and text(size_node, "height"):
        w, h = number(size_node, "width", "<size>"), number(size_node, "height", "<size>")
        if w != 0 and h != 0:  # some tools write 0 x 0: then the image header is read instead
            if not (0 < w < 2 ** 31 and 0 < h < 2 ** 31 and w.is_integer() and h.is_integer()):
                raise DataError(f"invalid image size {w}x{h}", path, "<size>")
            size = (int(w), int(h))
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}"
        name = text(obj, "name")
        if not name:
            raise DataError("missing <name>", path, where)
        box_node = obj.find("bndbox")
        if box_node is None:
            raise DataError("missing <bndbox>", path, where)
        x0, y0, x1, y1 = (number(box_node, t, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        difficult = text(obj, "difficult") in ("1", "true", "True")
        objects.append({"name": name, "box": (x0 - 1.0, y0 - 1.0, x1, y1), "difficult": difficult})
    return {"filename": text(root, "filename"), "size": size, "objects": objects}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise DataError("reading a YOLO data.yaml needs PyYAML: pip install 'focus-detr[formats]'", path) from None
    raw = _read_bytes(path, 1024 * 1024)
    try:
        data = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise DataError(f"not valid YAML ({_first_line(e)})", path) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a mapping with 'names' and the split folders, got {type(data).__name__}", path)
    return data


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise DataError(f"cannot read ({e.strerror or e})", path) from None
    if len(raw) > limit:
        raise DataError(f"larger than {limit // (1024 * 1024)} MiB: not an annotation file", path)
    return raw


def _read_text(path: Path) -> str:
    try:
        return _read_bytes(path, 64 * 1024 * 1024).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e})", path) from None


def _import_supervision(what: str):
    try:
        with warnings.catch_warnings():
            # supervision announces its NumPy fallback when OpenCV is absent; we only use its readers.
            warnings.simplefilter("ignore")
            import supervision as sv
    except ImportError:
        raise DataError(f"reading a {what} dataset needs the optional package supervision: "
                        "pip install 'focus-detr[formats]'") from None
    return sv


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def describe_split(split: DatasetSplit) -> str:
    """``"YOLO: data/labels/train"`` for messages."""
    return f"{split.layout}: {split.source}"


__all__ = ["ACCEPTED_LAYOUTS", "CocoJsonSplit", "DatasetSplit", "IMAGE_EXTENSIONS", "VocSplit", "YoloSplit",
           "describe_split", "find_split", "image_size", "require_split", "split_names"]
