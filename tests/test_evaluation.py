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
