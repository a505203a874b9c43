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
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import focus_detr
from focus_detr.data import CocoDetection
from focus_detr.data.errors import DataError
from focus_detr.data.image_io import load_image

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
    try:
        img.save(buf, format=fmt)
    except OSError:  # a mode this Pillow cannot write in this format (Pillow 13: mode I as PNG)
        assume(False)
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


# ---- numbers, nesting and paths an annotation file must not get away with --------------------------


def _one_image_dataset(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(folder / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 50}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0}],
            "categories": [{"id": 1, "name": "thing"}]}
    for key, value in changes.items():
        section, field = key.split("__")
        data[section][0][field] = value
    return data


HUGE = 10 ** 400  # json.dumps writes it as 401 digits; float() of it raises OverflowError


@pytest.mark.parametrize("changes,expected", [
    ({"annotations__bbox": [2, 3, HUGE, 12]}, "annotation id 1 .*'bbox' holds a number outside the floating-point range"),
    ({"annotations__bbox": [2, 3, HUGE, 12], "annotations__iscrowd": 1}, "annotation id 1 .*floating-point range"),
    ({"annotations__area": HUGE}, "annotation id 1 .*'area' holds a number outside"),
    ({"annotations__id": HUGE}, "annotations\\[0\\]: 'id' is outside the 64-bit integer range"),
    ({"images__width": HUGE}, "image id 1 .*'width' is outside the 64-bit integer range"),
    ({"images__file_name": "../outside/secret.png"}, "image id 1 .*points outside the image folder"),
    ({"images__file_name": "sub/../../secret.png"}, "points outside the image folder"),
    ({"images__file_name": "/etc/hostname"}, "points outside the image folder"),
    ({"images__file_name": "C:\\secret.png"}, "points outside the image folder"),
    ({"images__file_name": "a\x00.png"}, "NUL character"),
])
def test_out_of_range_numbers_and_escaping_paths_are_data_errors(tmp_path, changes, expected):
    folder = tmp_path / "ds"
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(_one_image_dataset(folder, **changes)))
    with pytest.raises(DataError, match=expected) as e:
        CocoDetection(folder, ann_file, filter_empty=False)
    assert str(ann_file) in str(e.value) and "\n" not in str(e.value)


@given(st.lists(st.sampled_from(["..", ".", "a", "b", "/", "\\", "c:", "~"]), max_size=8))
@settings(max_examples=200, deadline=None)
def test_accepted_file_names_never_leave_the_folder(parts):
    import posixpath

    from focus_detr.data.coco import _stays_inside

    name = "".join(parts)
    if not name or not _stays_inside(name):
        return
    base = "/data/images"
    resolved = posixpath.normpath(posixpath.join(base, name.replace("\\", "/")))
    assert resolved == base or resolved.startswith(base + "/"), name


@pytest.mark.parametrize("text,expected", [
    ('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"images": [], "x": ' + "9" * 5000 + "}", "not a usable annotation file"),
])
def test_absurd_json_is_a_data_error(tmp_path, text, expected):
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(text)
    with pytest.raises(DataError, match=expected) as e:
        CocoDetection(tmp_path, ann_file)
    assert str(ann_file) in str(e.value)


def test_outside_images_with_the_flag_and_symlinks_inside(tmp_path):
    outside = tmp_path / "outside"
    _one_image_dataset(outside)
    folder = tmp_path / "ds"
    folder.mkdir()
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(_one_image_dataset(tmp_path / "unused", images__file_name="../outside/a.png")))
    ds = CocoDetection(folder, ann_file, allow_outside_images=True)
    assert tuple(ds[0][0].shape) == (3, 40, 50)
    absolute = _one_image_dataset(tmp_path / "unused", images__file_name=str(outside / "a.png"))
    ann_file.write_text(json.dumps(absolute))
    assert len(CocoDetection(folder, ann_file, allow_outside_images=True)) == 1
    # A link inside the image folder is the folder owner's choice: followed without the flag.
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    ann_file.write_text(json.dumps(_one_image_dataset(tmp_path / "unused", images__file_name="linked/a.png")))
    assert tuple(CocoDetection(folder, ann_file)[0][0].shape) == (3, 40, 50)


# ---- the same through the console script: one line on stderr, exit 2, no traceback -------------------


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "model.pth"
    torch.manual_seed(0)
    focus_detr.api.save(focus_detr.build_model("tiny", num_classes=1, class_names=("thing",), test_short_side=64),
                        path)
    return path


def _cli(*args):
    import os
    import subprocess

    from cli_utils import cli_command

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cli_command() + list(args), capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("case", ["huge_number", "deep_nesting", "outside_path"])
def test_hostile_annotation_files_through_eval(tmp_path, weights_file, case):
    folder, ann_file = tmp_path / "ds", tmp_path / "val.json"
    if case == "huge_number":
        ann_file.write_text(json.dumps(_one_image_dataset(folder, annotations__bbox=[2, 3, HUGE, 12])))
        expected = "annotation id 1"
    elif case == "deep_nesting":
        _one_image_dataset(folder)
        ann_file.write_text('{"images": ' + "[" * 100_000 + "]" * 100_000 + "}")
        expected = "nested too deeply"
    else:
        _one_image_dataset(tmp_path / "outside")
        ann_file.write_text(json.dumps(_one_image_dataset(folder, images__file_name="../outside/a.png")))
        expected = "--allow-outside-images"
    proc = _cli("eval", str(weights_file), "--json", str(ann_file), "--images", str(folder), "--out",
                str(tmp_path / "ev"), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and str(ann_file) in proc.stderr and expected in proc.stderr
    assert not (tmp_path / "ev").exists()
    if case == "outside_path":
        proc = _cli("eval", str(weights_file), "--json", str(ann_file), "--images", str(folder), "--out",
                    str(tmp_path / "ev"), "--no-progress", "--allow-outside-images")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "ev" / "metrics.json").is_file()


def test_hostile_annotation_file_through_train(tmp_path):
    folder, ann_file = tmp_path / "ds", tmp_path / "train.json"
    ann_file.write_text(json.dumps(_one_image_dataset(folder, annotations__bbox=[2, 3, 12, HUGE])))
    proc = _cli("train", "--train-json", str(ann_file), "--train-images", str(folder), "--out", str(tmp_path / "run"),
                "--max-iters", "1", "--no-progress", "--no-tensorboard")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "floating-point range" in proc.stderr and str(ann_file) in proc.stderr
