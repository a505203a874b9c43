"""Tests of the data package: COCO reading and validation, transforms, collation, robust image loading."""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from focus_detr.data import (
    CocoDetection,
    Compose,
    DataError,
    DataWarning,
    RandomChoice,
    RandomCrop,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    build_test_transforms,
    build_train_transforms,
    collate_detection,
    load_image,
    make_collate,
    to_rgb_array,
)
from focus_detr.data.transforms import crop, hflip

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------------
# A tiny COCO dataset written on the fly


def _coco_dict() -> dict[str, Any]:
    """3 images (2 with boxes, 1 without), categories with non-contiguous, unsorted ids, one crowd box."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
            {"id": 7, "file_name": "c.png", "height": 16, "width": 16},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 11, "bbox": [10, 5, 20, 10], "iscrowd": 0, "area": 200},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 0, "area": 25},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [30, 20, 10, 10], "iscrowd": 1, "area": 100},
            {"id": 4, "image_id": 2, "category_id": 7, "bbox": [2.5, 3.5, 4, 6]},
        ],
        "categories": [
            {"id": 11, "name": "kettle"}, {"id": 3, "name": "apple"}, {"id": 7, "name": "bus"},
        ],
    }


def _write_images(root: Path, data: dict[str, Any]) -> None:
    for img in data["images"]:
        rng = np.random.default_rng(img["id"])
        arr = rng.integers(0, 256, size=(img["height"], img["width"], 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / img["file_name"])


def _make(tmp_path: Path, data: dict[str, Any] | None = None, write_images: bool = True,
          **kwargs: Any) -> CocoDetection:
    data = _coco_dict() if data is None else data
    if write_images:
        _write_images(tmp_path, data)
    ann = tmp_path / "instances_test.json"
    ann.write_text(json.dumps(data))
    return CocoDetection(tmp_path, ann, **kwargs)


# --------------------------------------------------------------------------------------------------
# COCO reader


def test_labels_contiguous_in_sorted_id_order_and_round_trip(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    assert ds.category_id_to_label == {3: 0, 7: 1, 11: 2}
    assert ds.class_names == ("apple", "bus", "kettle")
    assert ds.num_classes == 3
    for cid, label in ds.category_id_to_label.items():
        assert ds.label_to_category_id[label] == cid
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 0]  # kettle, apple; the crowd "bus" is gone


def test_getitem_format_and_xywh_to_xyxy(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 40, 60)
    assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
    assert target["boxes"].tolist() == [[10, 5, 30, 15], [0, 0, 5, 5]]
    assert target["image_id"] == 1
    assert target["orig_size"].tolist() == [40, 60] and target["size"].tolist() == [40, 60]
    assert target["orig_size"].dtype == torch.long and target["size"].dtype == torch.long
    # The pixels are the file's, in RGB, CHW.
    expected = np.array(Image.open(tmp_path / "a.png").convert("RGB"))
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    info = ds.get_image_info(1)
    assert info["id"] == 2 and info["height"] == 30 and info["width"] == 20 and info["num_boxes"] == 1


def test_crowd_ignored_and_empty_images_filtered_or_kept(tmp_path: Path) -> None:
    data = _coco_dict()
    # Image 2 now has only a crowd box: it counts as empty, like image 7 which has none.
    data["annotations"][3]["iscrowd"] = 1
    ds = _make(tmp_path, data)
    assert len(ds) == 1 and ds.image_ids == [1]
    assert ds.stats["crowd_ignored"] == 2
    kept = CocoDetection(tmp_path, tmp_path / "instances_test.json", filter_empty=False)
    assert kept.image_ids == [1, 2, 7]
    for i in (1, 2):
        _, target = kept[i]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_transforms_applied_and_size_reported(tmp_path: Path) -> None:
    ds = _make(tmp_path, transforms=build_test_transforms(short=80, max_size=1000))
    image, target = ds[0]
    assert image.shape == (3, 80, 120)
    assert target["size"].tolist() == [80, 120] and target["orig_size"].tolist() == [40, 60]
    assert torch.allclose(target["boxes"], torch.tensor([[20.0, 10, 60, 30], [0, 0, 10, 10]]))


def test_class_names_fix_the_label_space_by_name(tmp_path: Path) -> None:
    ds = _make(tmp_path, class_names=("bus", "zebra", "kettle", "apple"))
    assert ds.category_id_to_label == {7: 0, 11: 2, 3: 3}
    assert ds.label_to_category_id == {0: 7, 2: 11, 3: 3}
    assert ds.num_classes == 4
    assert ds[0][1]["labels"].tolist() == [2, 3]
    with pytest.raises(DataError, match="'kettle' is not in class_names"):
        _make(tmp_path, class_names=("bus", "apple"))


def test_coco_index_for_evaluation(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    coco = ds.coco
    assert sorted(coco.getImgIds()) == [1, 2, 7]
    assert coco.anns[4]["area"] == pytest.approx(24.0) and coco.anns[4]["iscrowd"] == 0  # filled in
    # Picklable (DataLoader workers) without the index.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._coco is None and len(clone) == len(ds)


def _mutate(fn):  # helper: build a broken copy of the tiny dataset
    data = copy.deepcopy(_coco_dict())
    fn(data)
    return data


BAD_JSON_CASES = [
    ("unknown_category", _mutate(lambda d: d["annotations"][0].update(category_id=99)),
     ["annotation id 1", "unknown category id 99"]),
    ("missing_bbox", _mutate(lambda d: d["annotations"][1].pop("bbox")), ["annotation id 2", "bbox"]),
    ("bbox_strings", _mutate(lambda d: d["annotations"][1].update(bbox=["0", "0", "5", "5"])),
     ["annotation id 2", "4 numbers"]),
    ("bbox_three_numbers", _mutate(lambda d: d["annotations"][1].update(bbox=[0, 0, 5])),
     ["annotation id 2", "bbox"]),
    ("missing_ann_id", _mutate(lambda d: d["annotations"][2].pop("id")), ["annotations[2]", "'id'"]),
    ("string_image_id", _mutate(lambda d: d["annotations"][0].update(image_id="1")),
     ["annotation id 1", "'image_id' must be an integer"]),
    ("bool_category", _mutate(lambda d: d["annotations"][0].update(category_id=True)),
     ["annotation id 1", "category_id"]),
    ("bad_iscrowd", _mutate(lambda d: d["annotations"][0].update(iscrowd=2)), ["annotation id 1", "iscrowd"]),
    ("duplicate_image_id", _mutate(lambda d: d["images"][2].update(id=2)), ["image id 2", "duplicate image id"]),
    ("duplicate_ann_id", _mutate(lambda d: d["annotations"][3].update(id=1)),
     ["annotation id 1", "duplicate annotation id"]),
    ("duplicate_category_id", _mutate(lambda d: d["categories"][2].update(id=3)),
     ["category id 3", "duplicate category id"]),
    ("ann_for_missing_image", _mutate(lambda d: d["annotations"][1].update(image_id=42)),
     ["annotation id 2", "image id 42"]),
    ("image_without_file_name", _mutate(lambda d: d["images"][0].pop("file_name")),
     ["image id 1", "file_name"]),
    ("image_bad_width", _mutate(lambda d: d["images"][0].update(width="60")), ["image id 1", "'width'"]),
    ("image_zero_height", _mutate(lambda d: d["images"][0].update(height=0)), ["image id 1", "non-positive"]),
    ("category_without_name", _mutate(lambda d: d["categories"][0].pop("name")), ["category id 11", "name"]),
    ("missing_images", _mutate(lambda d: d.pop("images")), ["'images'"]),
    ("missing_categories", _mutate(lambda d: d.pop("categories")), ["'categories'"]),
    ("annotations_not_list", _mutate(lambda d: d.update(annotations={"a": 1})), ["'annotations' must be a list"]),
    ("image_entry_not_object", _mutate(lambda d: d["images"].append(5)), ["images[3]", "object"]),
    ("top_level_list", [1, 2, 3], ["JSON object"]),
    ("no_images", _mutate(lambda d: (d.update(images=[], annotations=[]))), ["dataset is empty"]),
    ("all_filtered", _mutate(lambda d: d.update(annotations=[])), ["dataset is empty", "filter_empty=False"]),
]


@pytest.mark.parametrize("data,needles", [c[1:] for c in BAD_JSON_CASES], ids=[c[0] for c in BAD_JSON_CASES])
def test_malformed_json_raises_data_error_naming_file_and_record(tmp_path: Path, data: Any,
                                                                 needles: list[str]) -> None:
    ann = tmp_path / "instances_bad.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        CocoDetection(tmp_path, ann)
    msg = str(info.value)
    assert "instances_bad.json" in msg
    for needle in needles:
        assert needle in msg, msg
    assert info.value.path == str(ann)


@pytest.mark.parametrize("content,needle", [
    (b"{\"images\": [", "not valid JSON"),
    (b"", "empty"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
])
def test_unparsable_annotation_file(tmp_path: Path, content: bytes, needle: str) -> None:
    ann = tmp_path / "instances_x.json"
    ann.write_bytes(content)
    with pytest.raises(DataError, match=needle) as info:
        CocoDetection(tmp_path, ann)
    assert "instances_x.json" in str(info.value)
    with pytest.raises(DataError, match="not found"):
        CocoDetection(tmp_path, tmp_path / "nope.json")


def test_degenerate_boxes_dropped_with_counted_warning(tmp_path: Path) -> None:
    data = _coco_dict()
    base = len(data["annotations"])
    bad_boxes = [[1, 1, 0, 5], [1, 1, 5, -2], [float("nan"), 1, 3, 3], [1, 1, float("inf"), 3]]
    for k, bbox in enumerate(bad_boxes):
        data["annotations"].append({"id": 100 + k, "image_id": 1, "category_id": 3, "bbox": bbox})
    with pytest.warns(DataWarning, match=r"dropped 4 degenerate box\(es\).*100, 101, 102, 103"):
        ds = _make(tmp_path, data)
    assert ds.fixups["degenerate_boxes_dropped"] == 4
    assert ds.stats["annotations_in_file"] == base + 4
    assert ds[0][1]["boxes"].shape == (2, 4)  # only the two good ones of image 1


def test_boxes_outside_image_clipped_or_dropped_with_counted_warning(tmp_path: Path) -> None:
    data = _coco_dict()
    data["annotations"] += [
        {"id": 20, "image_id": 1, "category_id": 3, "bbox": [-5, 30, 20, 20]},    # sticks out left/bottom
        {"id": 21, "image_id": 1, "category_id": 3, "bbox": [100, 100, 5, 5]},    # entirely outside
        {"id": 22, "image_id": 1, "category_id": 3, "bbox": [40, 0, 20.004, 5]},  # float noise: no count
    ]
    with pytest.warns(DataWarning) as record:
        ds = _make(tmp_path, data)
    messages = " | ".join(str(w.message) for w in record)
    assert "clipped 1 box(es)" in messages and "annotation ids 20" in messages
    assert "dropped 1 box(es) lying entirely outside" in messages and "21" in messages
    assert ds.fixups["boxes_clipped"] == 1 and ds.fixups["boxes_outside_dropped"] == 1
    boxes = ds[0][1]["boxes"]
    assert boxes.shape == (4, 4)
    assert boxes[2].tolist() == [0, 30, 15, 40]
    assert boxes[3].tolist() == [40, 0, 60, 5]


def test_clean_file_gives_no_warning(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = _make(tmp_path)
        ds[0]
    assert all(v == 0 for v in ds.fixups.values())


def test_missing_or_corrupt_image_raises_naming_the_file(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    (tmp_path / "a.png").unlink()
    with pytest.raises(DataError, match=r"a\.png: image id 1|a\.png: image file not found"):
        ds[0]
    (tmp_path / "b.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"b\.png.*not an image"):
        ds[1]


def test_skip_bad_returns_next_good_item_with_its_own_target(tmp_path: Path) -> None:
    data = _coco_dict()
    data["annotations"].append({"id": 30, "image_id": 7, "category_id": 11, "bbox": [1, 1, 4, 4]})
    ds = _make(tmp_path, data, skip_bad=True)
    assert ds.image_ids == [1, 2, 7]
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.warns(DataWarning, match=r"b\.png.*0 bytes"):
        image, target = ds[1]
    assert target["image_id"] == 7 and image.shape == (3, 16, 16)
    assert target["labels"].tolist() == [2] and ds.fixups["bad_images_skipped"] == 1
    # A known-bad index is not read (or counted) again.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1][1]["image_id"] == 7
    assert ds.fixups["bad_images_skipped"] == 1
    for name in ("a.png", "c.png"):
        (tmp_path / name).unlink()
    with pytest.warns(DataWarning), pytest.raises(DataError, match="no readable image"):
        ds[0]


def test_image_size_different_from_json_is_an_error(tmp_path: Path) -> None:
    ds = _make(tmp_path)
    Image.new("RGB", (40, 60)).save(tmp_path / "a.png")  # json says 60 wide x 40 high: swapped
    with pytest.raises(DataError, match=r"a\.png: image id 1: .*swapped"):
        ds[0]
    Image.new("RGB", (20, 20)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match=r"b\.png: image id 2: image is 20x20"):
        ds[1]


def test_data_error_pickles_with_its_fields() -> None:
    err = DataError("broken", "/x/y.jpg", "image id 3")
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == "/x/y.jpg: image id 3: broken" and clone.path == "/x/y.jpg" and clone.item == "image id 3"


# --------------------------------------------------------------------------------------------------
# Transforms


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _target(boxes: list[list[float]]) -> dict[str, Any]:
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": b, "labels": torch.arange(len(b), dtype=torch.int64), "image_id": 5}


@pytest.mark.parametrize("as_pil", [False, True])
def test_flip_moves_boxes_and_twice_is_identity(as_pil: bool) -> None:
    arr = _random_image(8, 10)
    image = Image.fromarray(arr) if as_pil else arr
    target = _target([[1, 2, 3, 4], [0, 0, 10, 8]])
    once, t1 = hflip(image, target)
    assert t1["boxes"].tolist() == [[7, 2, 9, 4], [0, 0, 10, 8]]
    assert np.array_equal(np.asarray(once), arr[:, ::-1])
    twice, t2 = hflip(once, t1)
    assert type(twice) is type(image)
    assert np.array_equal(np.asarray(twice), arr)
    assert torch.equal(t2["boxes"], target["boxes"]) and t2["image_id"] == 5
    # The random version with p=1 / p=0.
    assert RandomHorizontalFlip(1.0)(image, target)[1]["boxes"].tolist() == t1["boxes"].tolist()
    assert RandomHorizontalFlip(0.0)(image, target)[1] is target


@pytest.mark.parametrize("hw,short,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1067)),
    ((800, 1333), 800, 1333, (800, 1333)),
    ((640, 480), 800, 1333, (1067, 800)),
    ((100, 1000), 800, 1333, (133, 1333)),    # very wide: capped by max_size
    ((1000, 100), 800, 1333, (1333, 133)),    # very tall
    ((1, 20000), 800, 1333, (1, 1333)),       # 0.07 px rounds to 0: clamped to 1
    ((20000, 1), 800, 1333, (1333, 1)),
    ((1, 1), 800, 1333, (800, 800)),
    ((427, 640), 480, 1333, (480, 719)),
])
def test_resize_rule_numbers(hw: tuple[int, int], short: int, max_size: int, expected: tuple[int, int]) -> None:
    assert ResizeShortestEdge.get_output_shape(hw[0], hw[1], short, max_size) == expected


def test_resize_scales_image_and_boxes() -> None:
    arr = _random_image(100, 200)
    target = _target([[10, 20, 30, 40]])
    out, t = ResizeShortestEdge((50,), 1000)(arr, target)
    assert out.shape == (50, 100, 3) and out.dtype == np.uint8
    assert t["boxes"].tolist() == [[5, 10, 15, 20]]
    # PIL bilinear (detectron2's resampling for uint8 images).
    ref = np.asarray(Image.fromarray(arr).resize((100, 50), Image.Resampling.BILINEAR))
    assert np.array_equal(out, ref)
    pil_out, _ = ResizeShortestEdge((50,), 1000)(Image.fromarray(arr), target)
    assert isinstance(pil_out, Image.Image) and pil_out.size == (100, 50)


def test_random_crop_clips_boxes_and_drops_emptied_ones() -> None:
    arr = _random_image(50, 60)
    target = _target([[0, 0, 10, 10], [5, 5, 30, 30], [40, 40, 60, 50]])
    out, t = crop(arr, target, top=8, left=12, height=30, width=25)
    assert out.shape == (30, 25, 3) and np.array_equal(out, arr[8:38, 12:37])
    # Box 0 ends at x=10 < 12: emptied and dropped, with its label. Box 2 starts at x=40 > 37: dropped.
    assert t["boxes"].tolist() == [[0, 0, 18, 22]] and t["labels"].tolist() == [1]
    # An image smaller than the crop range is kept whole (detectron2 caps the crop at the image size).
    small, ts = RandomCrop(384, 600)(arr, target, random.Random(0))
    assert small.shape == arr.shape and torch.equal(ts["boxes"], target["boxes"])


def test_transforms_are_deterministic_given_rng() -> None:
    arr = _random_image(60, 90)
    target = _target([[10, 10, 50, 40], [60, 5, 89, 59]])
    tf = build_train_transforms(scales=(32, 48, 64), max_size=100, crop=True, crop_resize_sizes=(40, 50, 60),
                                crop_size_range=(30, 45))
    outs = [tf(arr, target, random.Random(seed)) for seed in range(12)]
    again = [tf(arr, target, random.Random(seed)) for seed in range(12)]
    for (a, ta), (b, tb) in zip(outs, again):
        assert np.array_equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])
    assert len({a.shape for a, _ in outs}) > 1  # the seeds really vary the result
    # The global RNG (what the DataLoader reseeds per worker) is used when no rng is passed.
    random.seed(3)
    a, ta = tf(arr, target)
    random.seed(3)
    b, tb = tf(arr, target)
    assert np.array_equal(a, b) and torch.equal(ta["boxes"], tb["boxes"])


def test_build_train_transforms_shapes() -> None:
    arr = _random_image(48, 64)
    plain = build_train_transforms()
    assert isinstance(plain, Compose)
    rng = random.Random(0)
    for _ in range(5):
        out, _t = plain(arr, _target([[1, 1, 20, 20]]), rng)
        assert min(out.shape[:2]) in range(480, 801, 32) and max(out.shape[:2]) <= 1333
    assert isinstance(build_train_transforms(crop=True), RandomChoice)
    # RandomChoice really takes both branches.
    picks = RandomChoice([lambda im, t, r: (im, {"k": 0}), lambda im, t, r: (im, {"k": 1})])
    seen = {picks(arr, {}, random.Random(s))[1]["k"] for s in range(20)}
    assert seen == {0, 1}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    long_side=st.integers(1, 20000),
    short_side=st.integers(1, 12),
    tall=st.booleans(),
    short=st.integers(1, 64),
    max_size=st.integers(1, 96),
    seed=st.integers(0, 2**31 - 1),
    n_boxes=st.integers(0, 5),
)
def test_property_transforms_keep_boxes_consistent(long_side: int, short_side: int, tall: bool, short: int,
                                                   max_size: int, seed: int, n_boxes: int) -> None:
    h, w = (long_side, short_side) if tall else (short_side, long_side)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    xs = np.sort(rng.uniform(0, w, size=(n_boxes, 2)), axis=1)
    ys = np.sort(rng.uniform(0, h, size=(n_boxes, 2)), axis=1)
    boxes = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    target = _target(boxes.tolist())

    # Resize: dims follow the rule, are >= 1 px, the long side respects max_size; boxes keep their relative
    # position.
    resized, rt = ResizeShortestEdge((short,), max_size)(arr, target, random.Random(seed))
    nh, nw = resized.shape[:2]
    assert (nh, nw) == ResizeShortestEdge.get_output_shape(h, w, short, max_size)
    assert nh >= 1 and nw >= 1 and max(nh, nw) <= max_size
    if n_boxes:
        rel_in = target["boxes"] / torch.tensor([w, h, w, h])
        rel_out = rt["boxes"] / torch.tensor([nw, nh, nw, nh])
        assert torch.allclose(rel_in, rel_out, atol=1e-5)

    # Flip twice = identity.
    f1, ft1 = hflip(resized, rt)
    f2, ft2 = hflip(f1, ft1)
    assert np.array_equal(f2, resized) and torch.allclose(ft2["boxes"], rt["boxes"], atol=1e-3)

    # A full random pipeline (flip, resize, crop, resize): boxes inside the image, labels aligned.
    tf = Compose([RandomHorizontalFlip(0.5), ResizeShortestEdge((short, short + 3)),
                  RandomCrop(max(1, short // 2), short + 1), ResizeShortestEdge((short,), max_size)])
    out, ot = tf(arr, target, random.Random(seed))
    oh, ow = out.shape[:2]
    assert oh >= 1 and ow >= 1
    b = ot["boxes"]
    assert b.shape[0] == ot["labels"].shape[0] <= n_boxes
    if b.numel():
        assert (b[:, 0] >= -1e-4).all() and (b[:, 1] >= -1e-4).all()
        assert (b[:, 2] <= ow + 1e-3).all() and (b[:, 3] <= oh + 1e-3).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_property_crop_matches_box_intersection(h: int, w: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    xs = np.sort(rng.uniform(0, w, size=(4, 2)), axis=1)
    ys = np.sort(rng.uniform(0, h, size=(4, 2)), axis=1)
    target = _target(np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).tolist())
    out, t = RandomCrop(1, 40)(arr, target, random.Random(seed))
    ch, cw = out.shape[:2]
    # Find the window by matching pixels is ambiguous; recompute it from the same RNG stream instead.
    r = random.Random(seed)
    crop_h, crop_w = r.randint(min(h, 1), min(h, 40)), r.randint(min(w, 1), min(w, 40))
    top, left = r.randint(0, h - crop_h), r.randint(0, w - crop_w)
    assert (ch, cw) == (crop_h, crop_w) and np.array_equal(out, arr[top:top + ch, left:left + cw])
    expected = []
    for k, (x0, y0, x1, y1) in enumerate(target["boxes"].tolist()):
        ix0, iy0 = max(x0, left) - left, max(y0, top) - top
        ix1, iy1 = min(x1, left + cw) - left, min(y1, top + ch) - top
        if ix1 - ix0 > 1e-5 and iy1 - iy0 > 1e-5:
            expected.append((k, [ix0, iy0, ix1, iy1]))
    assert t["labels"].tolist() == [k for k, _ in expected]
    if expected:
        assert torch.allclose(t["boxes"], torch.tensor([b for _, b in expected], dtype=torch.float32), atol=1e-4)


# --------------------------------------------------------------------------------------------------
# Collation


def _item(h: int, w: int, boxes: list[list[float]], image_id: int) -> tuple[torch.Tensor, dict[str, Any]]:
    image = torch.from_numpy(_random_image(h, w, image_id)).permute(2, 0, 1).contiguous()
    t = _target(boxes)
    t.update(image_id=image_id, orig_size=torch.tensor([h * 2, w * 2]), size=torch.tensor([h, w]))
    return image, t


def test_collate_pads_masks_normalises_and_converts_boxes() -> None:
    batch = [_item(10, 20, [[2, 4, 12, 8]], 1), _item(16, 8, [], 2)]
    images, targets = collate_detection(batch, MEAN, STD)
    assert images.tensor.shape == (2, 3, 16, 20) and images.tensor.dtype == torch.float32
    assert images.image_sizes.tolist() == [[10, 20], [16, 8]]
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(images.tensor[0, :, :10, :20], (batch[0][0].float() - mean) / std)
    assert torch.allclose(images.tensor[1, :, :16, :8], (batch[1][0].float() - mean) / std)
    assert (images.tensor[0, :, 10:, :] == 0).all() and (images.tensor[1, :, :, 8:] == 0).all()
    assert not images.padding_mask[0, :10, :20].any() and images.padding_mask[0, 10:].all()
    assert not images.padding_mask[1, :16, :8].any() and images.padding_mask[1, :, 8:].all()

    t0, t1 = targets
    # cx = 7 / 20, cy = 6 / 10, w = 10 / 20, h = 4 / 10: normalised by the image's own size, not the batch's.
    assert torch.allclose(t0["boxes"], torch.tensor([[0.35, 0.6, 0.5, 0.4]]))
    assert t0["boxes"].dtype == torch.float32 and t0["labels"].dtype == torch.int64
    assert t0["boxes_xyxy"].tolist() == [[2, 4, 12, 8]]
    assert t0["image_id"] == 1 and t0["size"].tolist() == [10, 20] and t0["orig_size"].tolist() == [20, 40]
    assert t1["boxes"].shape == (0, 4) and t1["labels"].shape == (0,)


def test_make_collate_is_picklable_and_equivalent() -> None:
    fn = make_collate(MEAN, STD)
    clone = pickle.loads(pickle.dumps(fn))
    batch = [_item(6, 7, [[0, 0, 7, 6]], 3)]
    a, ta = fn(batch)
    b, tb = clone(batch)
    assert torch.equal(a.tensor, b.tensor) and torch.equal(ta[0]["boxes"], tb[0]["boxes"])
    assert torch.allclose(ta[0]["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_collate_rejects_inconsistent_size() -> None:
    image, t = _item(6, 7, [], 1)
    t["size"] = torch.tensor([7, 6])
    with pytest.raises(ValueError, match="does not match"):
        collate_detection([(image, t)], MEAN, STD)


def test_dataloader_end_to_end(tmp_path: Path) -> None:
    ds = _make(tmp_path, filter_empty=False, transforms=build_train_transforms(scales=(24, 32), max_size=64))
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=make_collate(MEAN, STD))
    images, targets = next(iter(loader))
    assert len(images) == 3 and [t["image_id"] for t in targets] == [1, 2, 7]
    for t, (h, w) in zip(targets, images.image_sizes.tolist()):
        assert t["size"].tolist() == [h, w]
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()


def test_dataloader_with_a_worker_process(tmp_path: Path) -> None:
    # The dataset, transforms and collate function must survive pickling into a worker.
    ds = _make(tmp_path, transforms=build_train_transforms(scales=(24, 32), max_size=64, crop=True,
                                                           crop_resize_sizes=(30,), crop_size_range=(16, 24)))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=1, collate_fn=make_collate(MEAN, STD))
    images, targets = next(iter(loader))
    assert images.tensor.shape[0] == 2 and [t["image_id"] for t in targets] == [1, 2]


def test_resize_range_sampling_and_weighted_choice() -> None:
    arr = _random_image(20, 30)
    tf = ResizeShortestEdge((10, 14), 1000, sample="range")
    shorts = {tf(arr, _target([]), random.Random(s))[0].shape[0] for s in range(40)}
    assert shorts == set(range(10, 15))
    never = RandomChoice([lambda im, t, r: (im, {"k": 0}), lambda im, t, r: (im, {"k": 1})], p=(0.0, 1.0))
    assert {never(arr, {}, random.Random(s))[1]["k"] for s in range(10)} == {1}
    with pytest.raises(ValueError):
        ResizeShortestEdge((10, 12, 14), 100, sample="range")


# --------------------------------------------------------------------------------------------------
# Image loading


def _save(img: Image.Image, path: Path, **kwargs: Any) -> Path:
    img.save(path, **kwargs)
    return path


def test_load_rgb_png_exact(tmp_path: Path) -> None:
    arr = _random_image(5, 7)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "x.png"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and np.array_equal(out, arr)
    assert out.flags.writeable


def test_load_grayscale(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = load_image(_save(Image.fromarray(gray), tmp_path / "g.png"))
    assert out.shape == (3, 4, 3) and all(np.array_equal(out[..., c], gray) for c in range(3))
    la = Image.fromarray(gray).convert("LA")
    assert np.array_equal(load_image(_save(la, tmp_path / "la.png"))[..., 0], gray)


def test_load_rgba_composite_or_drop(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[0, 1] = (10, 20, 30, 0)    # fully transparent
    rgba[1, 0] = (0, 0, 0, 128)     # half transparent black over white
    path = _save(Image.fromarray(rgba), tmp_path / "a.png")
    out = load_image(path)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert out[1, 0].tolist() == [127, 127, 127]
    dropped = load_image(path, alpha="drop")
    assert dropped[0, 1].tolist() == [10, 20, 30]


def test_load_palette(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[:2] = (200, 10, 10)
    arr[2:] = (10, 200, 10)
    pal = Image.fromarray(arr).quantize(colors=4)
    assert pal.mode == "P"
    out = load_image(_save(pal, tmp_path / "p.png"))
    assert out.shape == (4, 4, 3) and np.abs(out.astype(int) - arr).max() <= 2
    # Palette with a transparent index: composited over white.
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    out_t = load_image(_save(pal, tmp_path / "pt.png", transparency=int(np.asarray(pal)[0, 0])))
    assert out_t[0, 0].tolist() == [255, 255, 255] and np.abs(out_t[3, 3].astype(int) - arr[3, 3]).max() <= 2


@pytest.mark.parametrize("maximum,expected_max", [(65535, 255), (4095, 255), (200, 200)])
def test_load_16_bit(tmp_path: Path, maximum: int, expected_max: int) -> None:
    arr = np.linspace(0, maximum, 24).astype(np.uint16).reshape(4, 6)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = load_image(_save(img, tmp_path / "d.png"))
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    assert out.max() == expected_max and out.min() == 0
    assert np.all(np.diff(out[..., 0].reshape(-1).astype(int)) >= 0)  # monotone mapping


def test_load_cmyk_and_float(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    out = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert out.shape == (8, 8, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60 and out[..., 2].mean() < 60
    f = Image.fromarray(np.full((3, 3), 0.5, dtype=np.float32))
    assert f.mode == "F"
    out_f = load_image(_save(f, tmp_path / "f.tiff"))
    assert out_f.shape == (3, 3, 3) and (out_f == 128).all()


def test_load_applies_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((16, 32, 3), dtype=np.uint8)  # stored 32 wide x 16 high
    arr[:8, :8] = (255, 0, 0)  # red block at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(Image.fromarray(arr), tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(path)
    assert out.shape == (32, 16, 3)
    # Rotating 90 degrees clockwise moves the top-left corner to the top-right.
    assert out[:8, 8:, 0].mean() > 200 and out[:8, :8, 0].mean() < 50


def test_load_hostile_files_raise_data_error_naming_path(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("this is a text file, not a JPEG\n")
    buf = io.BytesIO()
    Image.fromarray(_random_image(64, 64)).save(buf, format="JPEG")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    buf = io.BytesIO()
    Image.fromarray(_random_image(64, 64)).save(buf, format="PNG")
    truncated_png = tmp_path / "trunc.png"
    truncated_png.write_bytes(buf.getvalue()[:200])
    cases = [(empty, "0 bytes"), (text, "not an image"), (truncated, "truncated"),
             (truncated_png, ""), (tmp_path / "missing.png", "not found"), (tmp_path, "directory")]
    for path, needle in cases:
        with pytest.raises(DataError) as info:
            load_image(path)
        assert str(path) in str(info.value) and needle in str(info.value), str(info.value)
        assert info.value.path == str(path)


def test_load_decompression_bomb_guard(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (100, 50)), tmp_path / "big.png")
    with pytest.raises(DataError, match=r"big\.png: image is 100x50 = 5000 pixels, above the limit of 4999"):
        load_image(path, max_pixels=4999)
    assert load_image(path, max_pixels=5000).shape == (50, 100, 3)


def test_load_extreme_aspect_ratios(tmp_path: Path) -> None:
    for h, w in ((1, 1), (1, 20000), (20000, 1)):
        out = load_image(_save(Image.new("RGB", (w, h), (1, 2, 3)), tmp_path / f"s{h}x{w}.png"))
        assert out.shape == (h, w, 3)
        tf = build_test_transforms(short=800, max_size=1333)
        res, _ = tf(out, _target([]))
        assert min(res.shape[:2]) >= 1 and max(res.shape[:2]) <= 1333


@pytest.mark.parametrize("arr,expected", [
    (np.full((2, 3), 7, dtype=np.uint8), 7),
    (np.full((2, 3, 1), 7, dtype=np.uint8), 7),
    (np.full((2, 3, 3), 7, dtype=np.uint8), 7),
    (np.full((2, 3, 4), 7, dtype=np.uint8), (7 * 7 + 255 * 248 + 127) // 255),  # alpha 7: over white
    (np.full((2, 3), 4095, dtype=np.uint16), 255),
    (np.full((2, 3), 1.0, dtype=np.float32), 255),
    (np.full((2, 3, 3), 100.0, dtype=np.float64), 100),
    (np.ones((2, 3), dtype=bool), 255),
])
def test_to_rgb_array_numpy(arr: np.ndarray, expected: int) -> None:
    out = to_rgb_array(arr)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8 and out.flags.writeable
    assert (out == expected).all()


def test_to_rgb_array_other_inputs(tmp_path: Path) -> None:
    arr = _random_image(4, 5)
    assert np.array_equal(to_rgb_array(Image.fromarray(arr)), arr)
    assert np.array_equal(to_rgb_array(torch.from_numpy(arr).permute(2, 0, 1)), arr)
    assert np.array_equal(to_rgb_array(torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0), arr)
    path = _save(Image.fromarray(arr), tmp_path / "z.png")
    assert np.array_equal(to_rgb_array(path), arr) and np.array_equal(to_rgb_array(str(path)), arr)
    with pytest.raises(DataError, match="shape"):
        to_rgb_array(np.zeros((4, 5, 2), dtype=np.uint8))
    with pytest.raises(DataError, match="empty"):
        to_rgb_array(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="dtype"):
        to_rgb_array(np.zeros((2, 2), dtype=np.complex64))
    with pytest.raises(DataError, match="C in"):
        to_rgb_array(torch.zeros(5, 4, 4))
    nan = np.full((2, 2), np.nan, dtype=np.float32)
    assert (to_rgb_array(nan) == 0).all() and not math.isnan(float(to_rgb_array(nan).sum()))
