"""Property-based tests: generated hostile images and annotation files fed to the dataset reader and to
``predict``. Invariants: no crash other than our documented :class:`DataError`, errors name the item, and no
wrong label or impossible box ever reaches the model."""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import focus_detr
from focus_detr.data import CocoDetection
from focus_detr.data.errors import DataError
from focus_detr.ops.image_io import load_image

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"), "JPEG": ("L", "RGB", "CMYK"),
           "TIFF": ("1", "L", "RGB", "RGBA", "CMYK", "I;16", "F"), "BMP": ("1", "L", "P", "RGB"),
           "GIF": ("L", "P")}


@st.composite
def image_bytes(draw):
    """Valid, truncated, empty or non-image bytes, and whether a valid decode is expected with its size."""
    kind = draw(st.sampled_from(["valid", "valid", "valid", "truncated", "empty", "garbage"]))
    if kind == "empty":
        return b"", None
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=200)), None
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    h = draw(st.one_of(st.integers(1, 40), st.just(1)))
    w = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 600])))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    base = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    if mode in ("I;16", "I", "F"):
        img = base.convert("L").convert(mode) if mode != "I;16" else Image.fromarray(
            rng.integers(0, 65535, (h, w), dtype=np.uint16))
    else:
        img = base.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    data = buf.getvalue()
    if kind == "truncated":
        cut = draw(st.integers(1, max(1, len(data) // 2)))
        return data[:cut], None
    return data, (h, w)


@given(image_bytes())
@SETTINGS
def test_load_image_never_crashes_outside_data_error(tmp_path, case):
    data, expected_hw = case
    path = tmp_path / "input.img"
    path.write_bytes(data)
    try:
        arr = load_image(path)
    except DataError as e:
        assert str(path) in str(e) or path.name in str(e)
        return
    # Some truncated files still decode (e.g. a cut after the pixel data); then they must be well formed.
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if expected_hw is not None:
        assert arr.shape[:2] == expected_hw


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return focus_detr.build_model("tiny").eval()


@given(image_bytes())
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_predict_on_hostile_files(tmp_path, tiny_model, case):
    data, expected_hw = case
    path = tmp_path / "input.png"
    path.write_bytes(data)
    try:
        det = tiny_model.predict(str(path), max_detections=10)
    except DataError as e:
        assert path.name in str(e)
        return
    h, w = load_image(path).shape[:2]
    assert det.boxes.shape == (len(det), 4) and torch.isfinite(det.boxes).all()
    assert (det.boxes[:, 0] >= 0).all() and (det.boxes[:, 2] <= w).all() and (det.boxes[:, 3] <= h).all()
    assert (det.labels >= 0).all() and (det.labels < tiny_model.cfg.num_classes).all()


# ---- annotation files --------------------------------------------------------------------------------
coordinate = st.one_of(st.floats(-50, 150, allow_nan=False), st.just(float("nan")), st.just(float("inf")),
                       st.just(0.0))


@st.composite
def coco_file(draw):
    num_images = draw(st.integers(0, 4))
    images = []
    for i in range(num_images):
        image_id = draw(st.one_of(st.just(i + 1), st.integers(1, 3)))  # sometimes duplicated
        images.append({"id": image_id, "file_name": f"im{i}.png", "height": 64, "width": 80})
    categories = [{"id": cid, "name": f"c{cid}"} for cid in draw(st.lists(st.integers(1, 90), min_size=1,
                                                                           max_size=4, unique=True))]
    annotations = []
    for k in range(draw(st.integers(0, 8))):
        ann = {"id": k + 1,
               "image_id": draw(st.integers(1, 5)),
               "category_id": draw(st.one_of(st.sampled_from([c["id"] for c in categories]), st.integers(91, 95))),
               "bbox": [draw(coordinate) for _ in range(4)],
               "iscrowd": draw(st.sampled_from([0, 0, 0, 1])),
               "area": 1.0}
        if draw(st.integers(0, 9)) == 0:
            del ann[draw(st.sampled_from(["bbox", "category_id", "image_id"]))]
        annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": categories}


def _clip(box, w, h):
    x, y, bw, bh = box
    x0, y0, x1, y1 = max(0, x), max(0, y), min(w, x + bw), min(h, y + bh)
    return x0, y0, x1, y1


@given(coco_file())
@SETTINGS
def test_coco_reader_on_hostile_annotations(tmp_path, data):
    folder = tmp_path / "ds"
    folder.mkdir(exist_ok=True)
    for img in data["images"]:
        Image.fromarray(np.zeros((img["height"], img["width"], 3), np.uint8)).save(folder / img["file_name"])
    ann_file = folder / "instances.json"
    ann_file.write_text(json.dumps(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = CocoDetection(folder, ann_file, filter_empty=False)
    except DataError as e:
        assert "instances.json" in str(e)
        return
    by_id = {img["id"]: img for img in data["images"]}
    for idx in range(len(ds)):
        image, target = ds[idx]
        info = by_id[target["image_id"]]
        h, w = info["height"], info["width"]
        assert tuple(image.shape) == (3, h, w)
        boxes, labels = target["boxes"], target["labels"]
        assert torch.isfinite(boxes).all()
        assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        # Every returned (box, label) comes from a non-crowd annotation of this image with that category.
        sources = [a for a in data["annotations"] if a.get("image_id") == target["image_id"]
                   and not a.get("iscrowd")]
        for box, label in zip(boxes.tolist(), labels.tolist()):
            category = ds.label_to_category_id[label]
            candidates = [_clip(a["bbox"], w, h) for a in sources if a.get("category_id") == category]
            assert any(all(math.isclose(u, v, abs_tol=1e-3) for u, v in zip(box, c)) for c in candidates), \
                f"box {box} label {label} has no source annotation"
