"""COCO evaluation (engine/evaluate.py) against pycocotools computed independently in the tests."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from focus_detr.data.class_map import ClassMismatchError, map_categories, parse_class_map
from focus_detr.data.errors import DataError
from focus_detr.engine.data import build_eval_dataset
from focus_detr.engine.evaluate import COCO_STAT_NAMES, coco_evaluate, evaluate, format_metrics
from focus_detr.model.postprocess import Detections

# Non-contiguous category ids on purpose: results must carry the file's ids, not contiguous labels.
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 11, "name": "bird"}]


def _gt_dataset() -> dict:
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, 7):
        h, w = 120 + 10 * i, 160
        images.append({"id": 100 + i, "file_name": f"{i:03d}.png", "height": h, "width": w})
        for _ in range(1 + i % 3):
            bw, bh = float(rng.uniform(12, 70)), float(rng.uniform(12, 60))
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            cat = CATEGORIES[int(rng.integers(0, 2))]["id"]  # "bird" has no ground truth at all
            annotations.append({"id": len(annotations) + 1, "image_id": 100 + i, "category_id": cat,
                                "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _coco(data: dict) -> COCO:
    coco = COCO()
    coco.dataset = copy.deepcopy(data)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _reference_stats(data: dict, results: list[dict], cat_ids: list[int] | None = None) -> np.ndarray:
    """pycocotools, used the plain documented way."""
    gt = _coco(data)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        if cat_ids is not None:
            ev.params.catIds = cat_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def _perfect(data: dict) -> list[dict]:
    return [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            for a in data["annotations"]]


def test_ground_truth_as_predictions_scores_one():
    data = _gt_dataset()
    m = coco_evaluate(_coco(data), _perfect(data))
    assert m["AP"] == pytest.approx(1.0)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(1.0)
    assert m["per_class"]["cat"] == pytest.approx(1.0)
    assert m["per_class"]["dog"] == pytest.approx(1.0)
    assert m["per_class"]["bird"] is None  # no ground truth: undefined, not 0
    assert m["num_images"] == len(data["images"])
    # Area ranges without any ground truth are undefined (pycocotools' -1) -> None.
    for key in ("APs", "APm", "APl"):
        assert m[key] is None or m[key] == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [(2.0, 0.0), (5.0, 3.0), (0.0, 9.0), (14.0, -6.0)])
def test_shifted_predictions_match_pycocotools(shift):
    data = _gt_dataset()
    dx, dy = shift
    results = []
    for k, a in enumerate(data["annotations"]):
        x, y, w, h = a["bbox"]
        # Different objects shifted by different multiples, with scores that rank them differently.
        f = 1 + k % 3
        results.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [x + f * dx, y + f * dy, w, h], "score": 0.9 - 0.05 * k})
    # A false positive of the third class and a duplicate of one object.
    results.append({"image_id": 101, "category_id": 11, "bbox": [1.0, 1.0, 20.0, 20.0], "score": 0.95})
    results.append(dict(results[0], score=0.5))
    m = coco_evaluate(_coco(data), results)
    ref = _reference_stats(data, results)
    for name, value in zip(COCO_STAT_NAMES, ref):
        if value < 0:
            assert m[name] is None
        else:
            assert m[name] == pytest.approx(float(value), abs=1e-12), name
    assert 0.0 <= m["AP"] < 1.0
    for cat in CATEGORIES[:2]:
        per_class_ref = _reference_stats(data, results, cat_ids=[cat["id"]])[0]
        assert m["per_class"][cat["name"]] == pytest.approx(float(per_class_ref), abs=1e-12)


def test_partial_shift_has_known_ap50_but_lower_ap():
    """A 1-D shift by s of a box of width w has IoU (w - s) / (w + s): s = 0.3 w gives IoU 0.538."""
    data = _gt_dataset()
    results = []
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        s = w * 0.3
        results.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": [x + s, y, w, h],
                        "score": 1.0})
    m = coco_evaluate(_coco(data), results)
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(0.0)
    # IoU 0.538 passes the threshold 0.50 only: 1 of the 10 thresholds.
    assert m["AP"] == pytest.approx(0.1, abs=1e-6)


def test_no_predictions_scores_zero_and_image_subset():
    data = _gt_dataset()
    m = coco_evaluate(_coco(data), [])
    assert m["AP"] == 0.0 and m["num_detections"] == 0
    # Same as pycocotools with one useless detection: 0 where ground truth exists, undefined elsewhere.
    useless = [{"image_id": 101, "category_id": 3, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.01}]
    for name, value in zip(COCO_STAT_NAMES, _reference_stats(data, useless)):
        assert m[name] == (None if value < 0 else pytest.approx(0.0)), name
    assert m["per_class"]["bird"] is None and m["per_class"]["cat"] == 0.0
    # Restricting to a subset of images: predictions perfect on those images only.
    ids = [101, 102]
    subset = [r for r in _perfect(data) if r["image_id"] in ids]
    m = coco_evaluate(_coco(data), subset, image_ids=ids)
    assert m["AP"] == pytest.approx(1.0)
    assert m["num_images"] == 2
    assert "AP 1.000" in format_metrics(m)


# --------------------------------------------------------------------------------------------------
# evaluate(): model outputs -> COCO results with the file's category ids, in original-image pixels.


class _OracleModel(torch.nn.Module):
    """Stands in for FocusDETR: returns the ground truth of the images in dataset order (batch size 1)."""

    def __init__(self, data: dict, label_of: dict[int, int], cfg) -> None:
        super().__init__()
        self.cfg = cfg
        self.queue = []
        for img in data["images"]:
            anns = [a for a in data["annotations"] if a["image_id"] == img["id"]]
            boxes = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                   a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32)
            labels = torch.tensor([label_of[a["category_id"]] for a in anns])
            self.queue.append((img["height"], img["width"], boxes, labels))
        self.seen_sizes = []

    def forward(self, batch):
        return batch

    def postprocess(self, outputs, original_sizes):
        dets = []
        for size, input_size in zip(original_sizes.tolist(), outputs.image_sizes.tolist()):
            h, w, boxes, labels = self.queue.pop(0)
            assert size == [h, w]  # the evaluator passes each image's original size
            self.seen_sizes.append(input_size)
            dets.append(Detections(boxes, torch.ones(len(labels)), labels, [str(v) for v in labels.tolist()],
                                   torch.arange(len(labels))))
        return dets


def _write_dataset(root: Path, data: dict) -> None:
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "val").mkdir(parents=True)
    for img in data["images"]:
        Image.new("RGB", (img["width"], img["height"]), (90, 120, 150)).save(root / "images" / "val" / img["file_name"])
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))


def test_evaluate_maps_labels_back_and_writes_files(tmp_path):
    from focus_detr.config import make_config

    data = _gt_dataset()
    _write_dataset(tmp_path / "d", data)
    cfg = make_config("tiny", num_classes=3, class_names=("cat", "dog", "bird"), test_short_side=64)
    dataset = build_eval_dataset(tmp_path / "d", "val", cfg.test_short_side, cfg.test_max_size, cfg.class_names)
    label_of = dataset.category_id_to_label
    assert label_of == {3: 0, 7: 1, 11: 2}
    model = _OracleModel(data, label_of, cfg)
    m = evaluate(model, dataset, torch.device("cpu"), tmp_path / "out", extra={"note": "x"})
    assert m["AP"] == pytest.approx(1.0)
    assert all(min(s) == 64 for s in model.seen_sizes)  # the test-time resize was applied
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert {p["category_id"] for p in preds} == {3, 7}
    assert set(preds[0]) == {"image_id", "category_id", "bbox", "score"}
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["AP"] == pytest.approx(1.0) and written["note"] == "x" and "summary" not in written
    assert "Average Precision" in (tmp_path / "out" / "coco_summary.txt").read_text()


# --------------------------------------------------------------------------------------------------
# The model's classes are paired with the dataset's categories before evaluating, or refused.


@pytest.mark.parametrize("names,num,class_map,expected", [
    (("cat", "dog", "bird"), 3, None, {3: 0, 7: 1, 11: 2}),                     # by name
    (("bird", "cat", "dog", "fish"), 4, None, {3: 1, 7: 2, 11: 0}),              # by name, other order
    (None, 3, None, {3: 0, 7: 1, 11: 2}),                                        # by count, sorted ids
    (None, 10, {"3": 0, "dog": 1, "bird": None}, {3: 0, 7: 1}),                  # ids or names; null = out
    (("kitty", "doggo"), 2, {"cat": "kitty", "dog": "doggo"}, {3: 0, 7: 1}),     # bird: no box, may stay out
    (("cat", "dog", "bird"), 3, {"cat": "dog", "dog": "cat"}, {3: 1, 7: 0, 11: 2}),  # map overrides names
])
def test_map_categories(names, num, class_map, expected):
    annotated = {3, 7}
    assert map_categories(CATEGORIES, annotated, names, num, class_map) == expected


@pytest.mark.parametrize("names,num,class_map,message", [
    (None, 10, None, "the model has 10 classes without names but the dataset has 3 categories.*--class-map"),
    (None, 2, None, "has 2 classes without names but the dataset has 3.*--class-map '\\{\"3\": 0, \"7\": 1, ...\\}'"),
    (("kitty", "dog", "bird"), 3, None, "dataset categories \\['cat'\\] \\(1 with boxes\\) are not classes.*"
                                        "--class-map '\\{\"cat\": \"MODEL_CLASS\"\\}'"),
    (None, 10, {"3": 0}, "dataset categories \\['dog'\\]"),
    (None, 10, {"3": 10}, "class map value 10 is not a model class index \\(0..9\\)"),
    (None, 10, {"3": "cat"}, "the model has no class names"),
    (("cat", "dog"), 2, {"3": "lion"}, "'lion' is not a class of the model"),
    (("cat", "dog"), 2, {"42": 0}, "key '42' is neither a category id nor a category name"),
    (("cat", "dog"), 2, {"cat": "dog"}, "both map to model class 1"),
])
def test_map_categories_refuses_with_a_one_line_hint(names, num, class_map, message):
    with pytest.raises(ClassMismatchError, match=message) as e:
        map_categories(CATEGORIES, {3, 7}, names, num, class_map, "val.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("val.json: ")


def test_parse_class_map(tmp_path):
    assert parse_class_map('{"1": 0, "dog": "hound", "x": null}') == {"1": 0, "dog": "hound", "x": None}
    (tmp_path / "m.json").write_text('{"1": 2}')
    assert parse_class_map(str(tmp_path / "m.json")) == {"1": 2}
    for bad, message in (("[1, 2]", "must be a JSON object"), ('{"1": 0.5}', "model class index, a name or null"),
                         ('{"1": true}', "model class index"), ("{oops", "not valid JSON"),
                         (str(tmp_path / "missing.json"), "cannot read the class map")):
        with pytest.raises(DataError, match=message):
            parse_class_map(bad)


def _renamed(data: dict, old: str, new: str) -> dict:
    data = copy.deepcopy(data)
    for c in data["categories"]:
        if c["name"] == old:
            c["name"] = new
    return data


def test_mismatched_names_are_refused_and_class_map_pairs_them(tmp_path):
    from focus_detr.config import make_config

    cfg = make_config("tiny", num_classes=3, class_names=("cat", "dog", "bird"), test_short_side=64)
    data = _renamed(_gt_dataset(), "cat", "kitty")
    _write_dataset(tmp_path / "d", data)
    with pytest.raises(ClassMismatchError, match="\\['kitty'\\].*--class-map"):
        build_eval_dataset(tmp_path / "d", "val", 64, cfg.test_max_size, cfg.class_names, cfg.num_classes)
    # Paired by the map, the oracle's predictions (in the model's label space) score 1 ...
    dataset = build_eval_dataset(tmp_path / "d", "val", 64, cfg.test_max_size, cfg.class_names, cfg.num_classes,
                                 {"kitty": "cat"})
    assert dataset.category_id_to_label == {3: 0, 7: 1, 11: 2}
    m = evaluate(_OracleModel(data, dataset.category_id_to_label, cfg), dataset, torch.device("cpu"))
    assert m["AP"] == pytest.approx(1.0) and set(m["per_class"]) == {"kitty", "dog", "bird"}
    # ... a swapped map scores 0 (the map is what decides), and null leaves a category out of the AP.
    swapped = build_eval_dataset(tmp_path / "d", "val", 64, cfg.test_max_size, cfg.class_names, cfg.num_classes,
                                 {"kitty": "dog", "dog": "cat"})
    m = evaluate(_OracleModel(data, dataset.category_id_to_label, cfg), swapped, torch.device("cpu"))
    assert m["AP"] == pytest.approx(0.0)
    only_dog = build_eval_dataset(tmp_path / "d", "val", 64, cfg.test_max_size, cfg.class_names, cfg.num_classes,
                                  {"kitty": None})
    m = evaluate(_OracleModel(data, dataset.category_id_to_label, cfg), only_dog, torch.device("cpu"))
    assert set(m["per_class"]) == {"dog", "bird"} and m["AP"] == pytest.approx(1.0)
    assert {p for p in m["per_class"] if m["per_class"][p] is not None} == {"dog"}


def test_evaluate_refuses_a_dataset_in_another_label_space(tmp_path):
    from focus_detr.config import make_config

    data = _gt_dataset()
    _write_dataset(tmp_path / "d", data)
    plain = build_eval_dataset(tmp_path / "d", "val", 64, 1333, None)  # labels = the file's 3 categories
    for cfg in (make_config("tiny", num_classes=10, test_short_side=64),
                make_config("tiny", num_classes=3, class_names=("bird", "cat", "dog"), test_short_side=64)):
        with pytest.raises(ClassMismatchError, match="are not the model's classes"):
            evaluate(_OracleModel(data, plain.category_id_to_label, cfg), plain, torch.device("cpu"))


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory):
    from focus_detr.data import make_shapes_dataset

    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, 1, 2, seed=2, image_size=(64, 80), objects_per_image=(1, 3), min_object_size=10)
    return root


def _save_model(path: Path, num_classes: int, class_names=None) -> Path:
    import focus_detr

    torch.manual_seed(0)
    model = focus_detr.build_model("tiny", num_classes=num_classes, class_names=class_names, test_short_side=64,
                                   **{"decoder.num_queries": 20, "encoder.oesm_topk": 20})
    return focus_detr.api.save(model, path)


def _eval_cli(*args):
    import os
    import subprocess

    from cli_utils import cli_command

    return subprocess.run(cli_command() + ["eval", *args, "--no-progress"], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("num_classes", [10, 3])
def test_eval_cli_refuses_unnamed_classes_of_another_count(tmp_path, shapes_val, num_classes):
    weights = _save_model(tmp_path / "m.pth", num_classes)
    proc = _eval_cli(str(weights), "--data", str(shapes_val), "--out", str(tmp_path / "ev"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "error: 8" not in proc.stderr
    assert f"the model has {num_classes} classes without names but the dataset has 6 categories" in proc.stderr
    assert "--class-map" in proc.stderr and not (tmp_path / "ev").exists()
    # The map the message asks for makes it run; predictions carry the dataset's category ids.
    class_map = {str(cid): k for k, cid in enumerate(range(1, 7)) if k < num_classes}
    class_map.update({str(cid): None for cid in range(1, 7) if str(cid) not in class_map})
    proc = _eval_cli(str(weights), "--data", str(shapes_val), "--out", str(tmp_path / "ev"), "--class-map",
                     json.dumps(class_map))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert len(metrics["per_class"]) == min(num_classes, 6) and metrics["class_map"] == class_map
    preds = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert {p["category_id"] for p in preds} <= {int(c) for c, v in class_map.items() if v is not None}


def test_eval_cli_refuses_other_names_and_class_map_file_pairs_them(tmp_path, shapes_val):
    names = ("disc", "square", "triangle", "star", "ring", "cross")
    weights = _save_model(tmp_path / "m.pth", 6, names)
    proc = _eval_cli(str(weights), "--data", str(shapes_val), "--out", str(tmp_path / "ev"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "dataset categories ['circle'] (1 with boxes) are not classes of the model" in proc.stderr
    (tmp_path / "map.json").write_text('{"circle": "disc"}')
    proc = _eval_cli(str(weights), "--data", str(shapes_val), "--out", str(tmp_path / "ev"), "--class-map",
                     str(tmp_path / "map.json"))
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads((tmp_path / "ev" / "metrics.json").read_text())["per_class"]) == set(
        ("circle",) + names[1:])
