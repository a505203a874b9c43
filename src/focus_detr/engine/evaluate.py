"""COCO box evaluation with pycocotools.

:func:`coco_evaluate` scores COCO-results-format predictions against a ground-truth ``COCO`` index;
:func:`predict_dataset` runs a model over a dataset (each process its own shard, gathered on every
process); :func:`evaluate` does both and writes ``predictions.json`` (COCO results format, category ids of
the annotation file) and ``metrics.json``.

Metrics are fractions in [0, 1] as pycocotools computes them: ``AP`` (IoU .50:.95), ``AP50``, ``AP75``,
``APs`` / ``APm`` / ``APl`` (area < 32², 32²..96², > 96²), the recalls ``AR1`` / ``AR10`` / ``AR100`` /
``ARs`` / ``ARm`` / ``ARl``, and ``per_class`` AP by class name. A value pycocotools reports as -1 (no
ground truth in that area range or class) is written as ``None`` (JSON ``null``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..data import CocoDetection
from ..data.class_map import ClassMismatchError
from .data import build_eval_loader
from .distributed import DistInfo, all_gather_objects

COCO_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
HEADLINE_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _defined(value: float) -> float | None:
    value = float(value)
    return None if value < 0 or not np.isfinite(value) else value


def coco_evaluate(coco_gt: COCO, results: Sequence[dict[str, Any]],
                  image_ids: Sequence[int] | None = None,
                  category_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """Box AP of ``results`` (COCO results format: ``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    ``image_ids`` restricts the evaluation to these images (default: every image of ``coco_gt``); images
    without predictions count as misses. ``category_ids`` restricts it to these categories (default: every
    category; results of other categories must not be passed). Returns the metrics described in the module docstring plus
    ``num_images``, ``num_detections`` and ``summary`` (pycocotools' printed table).
    """
    ids = sorted(int(i) for i in (image_ids if image_ids is not None else coco_gt.getImgIds()))
    cat_ids = sorted(int(c) for c in (category_ids if category_ids is not None else coco_gt.getCatIds()))
    names = {c["id"]: c["name"] for c in coco_gt.loadCats(cat_ids)}
    base = {"num_images": len(ids), "num_detections": len(results)}
    if not results:
        # pycocotools cannot load an empty result list. With no detection every AP / AR is 0 where ground truth
        # exists and undefined (None) where it does not, per area range as pycocotools defines them.
        areas = [a["area"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=ids, catIds=cat_ids, iscrowd=False))]
        ranges = {"": (0, 1e10), "s": (0, 32 ** 2), "m": (32 ** 2, 96 ** 2), "l": (96 ** 2, 1e10)}
        defined = {k: any(lo <= a <= hi for a in areas) for k, (lo, hi) in ranges.items()}
        stats: dict[str, Any] = {}
        for name in COCO_STAT_NAMES:
            suffix = name[-1] if name[-1] in "sml" else ""
            stats[name] = 0.0 if defined[suffix] else None
        per_class: dict[str, float | None] = {names[c]: (0.0 if coco_gt.getAnnIds(imgIds=ids, catIds=[c], iscrowd=False)
                                                          else None) for c in cat_ids}
        return {**stats, "per_class": per_class, **base, "summary": "no detections"}
    # loadRes modifies the records (adds area / id): give it a copy.
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(list(results)))
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    evaluator.params.imgIds = ids
    evaluator.params.catIds = cat_ids
    with contextlib.redirect_stdout(io.StringIO()):  # progress chatter
        evaluator.evaluate()
        evaluator.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        evaluator.summarize()
    stats = {name: _defined(v) for name, v in zip(COCO_STAT_NAMES, evaluator.stats)}
    # precision: [T iou thresholds, R recall points, K classes, A area ranges, M max-dets]; area "all" is
    # index 0, maxDets 100 is the last; -1 marks "no ground truth".
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[cat_id]] = float(p.mean()) if p.size else None
    return {**stats, "per_class": per_class, **base, "summary": out.getvalue().rstrip()}


@torch.no_grad()
def predict_dataset(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, info: DistInfo = DistInfo(),
                    batch_size: int = 1, num_workers: int = 0, max_images: int | None = None,
                    progress: bool = False) -> tuple[list[dict[str, Any]], list[int]]:
    """Run ``model`` (a :class:`~focus_detr.model.FocusDETR`) over ``dataset`` and return
    ``(records, image_ids)``: COCO-results records of every image (all processes' shards gathered, on every
    process) and the ids of the images predicted.

    Each process predicts images ``rank::world_size`` of the first ``max_images`` items. Boxes are in the
    original image's pixels; labels are mapped back with ``dataset.label_to_category_id``, and detections of
    model classes that stand for no dataset category (see :mod:`focus_detr.data.class_map`) are dropped.
    """
    n = len(dataset) if max_images is None else min(len(dataset), max_images)
    indices = list(range(n))[info.rank::info.world_size]
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    image_ids: list[int] = []
    cfg = model.cfg
    try:
        if indices:
            loader = build_eval_loader(dataset, indices, batch_size, num_workers, cfg.pixel_mean, cfg.pixel_std)
            # A bar only on a terminal: redirected logs must not fill with \r redraws.
            show_bar = progress and info.is_main and sys.stderr.isatty()
            for images, targets in tqdm(loader, desc="eval", disable=not show_bar, leave=False, dynamic_ncols=True):
                outputs = model(images.to(device))
                original = torch.stack([t["orig_size"] for t in targets]).to(device)
                for det, t in zip(model.postprocess(outputs, original), targets):
                    records.extend(_coco_records(det, int(t["image_id"]), dataset.label_to_category_id))
                    image_ids.append(int(t["image_id"]))
    finally:
        model.train(was_training)
    gathered = all_gather_objects((records, image_ids))
    all_records = [r for part, _ in gathered for r in part]
    all_ids = [i for _, part in gathered for i in part]
    return all_records, all_ids


def check_label_space(model_cfg: Any, dataset: CocoDetection) -> None:
    """Refuse to evaluate when the dataset's labels do not mean the model's classes (a wrong AP otherwise).

    A dataset built by :func:`~focus_detr.engine.data.build_eval_dataset` with the model's ``class_names`` /
    ``num_classes`` always passes (its categories were paired then, or refused with a class-map hint).
    """
    names = model_cfg.class_names
    if dataset.num_classes != model_cfg.num_classes or (names is not None and tuple(dataset.class_names) != tuple(names)):
        raise ClassMismatchError(
            f"the dataset's labels ({dataset.num_classes}: {', '.join(dataset.class_names[:6])}"
            f"{', ...' if dataset.num_classes > 6 else ''}) are not the model's classes ({model_cfg.num_classes}"
            f"{': ' + ', '.join(names[:6]) if names else ' unnamed'}{', ...' if names and len(names) > 6 else ''}); "
            "build it with build_eval_dataset(..., class_names=model.cfg.class_names, "
            "num_classes=model.cfg.num_classes, class_map=...) to pair them", dataset.annotation_file)


def _coco_records(det: Any, image_id: int, label_to_category_id: dict[int, int]) -> list[dict[str, Any]]:
    """COCO results records of one image's detections whose label stands for a dataset category."""
    records = []
    for box, score, label in zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist()):
        category = label_to_category_id.get(int(label))
        if category is None:
            continue
        x0, y0, x1, y1 = box
        records.append({"image_id": image_id, "category_id": int(category), "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score)})
    return records


def evaluate(model: torch.nn.Module, dataset: CocoDetection, device: torch.device, out_dir: str | Path | None = None,
             info: DistInfo = DistInfo(), batch_size: int = 1, num_workers: int = 0, max_images: int | None = None,
             progress: bool = False, extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Predict ``dataset`` with ``model`` and score it with pycocotools.

    On the main process returns the metrics dict (see :func:`coco_evaluate`, plus ``seconds``) and, with
    ``out_dir``, writes ``predictions.json`` (COCO results format), ``metrics.json`` (the metrics without the
    printed summary, plus ``extra``) and ``coco_summary.txt``. Other processes return None.
    """
    check_label_space(model.cfg, dataset)
    start = time.perf_counter()
    records, image_ids = predict_dataset(model, dataset, device, info, batch_size, num_workers, max_images, progress)
    if not info.is_main:
        return None
    metrics = coco_evaluate(dataset.coco, records, image_ids, sorted(dataset.label_to_category_id.values()))
    metrics["seconds"] = time.perf_counter() - start
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(records))
        summary = metrics.get("summary", "")
        (out / "coco_summary.txt").write_text(summary + "\n")
        payload = {k: v for k, v in metrics.items() if k != "summary"}
        payload.update(extra or {})
        (out / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")
    return metrics


def format_metrics(metrics: dict[str, Any], keys: Sequence[str] = HEADLINE_METRICS) -> str:
    """``AP 0.412  AP50 0.601 ...`` (``n/a`` for undefined values)."""
    parts = []
    for k in keys:
        v = metrics.get(k)
        parts.append(f"{k} {v:.3f}" if isinstance(v, (int, float)) else f"{k} n/a")
    return "  ".join(parts)
