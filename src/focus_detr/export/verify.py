"""Running an exported ONNX file with onnxruntime and checking it against the PyTorch model."""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

    from ..model.detector import FocusDETR


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {module!r}: pip install 'focus-detr[onnx]' "
                          f"(or pip install onnx onnxscript onnxruntime)") from e


def onnx_session(path: str | os.PathLike[str]) -> "onnxruntime.InferenceSession":
    """An onnxruntime CPU session for ``path`` that logs errors only."""
    ort = require("onnxruntime", "running an exported ONNX file")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_with_pytorch(model: FocusDETR, onnx_path: str | os.PathLike[str],
                         sizes: Sequence[tuple[int, int]], seed: int = 0) -> list[dict[str, Any]]:
    """Run the ONNX file and ``model`` on one random image per size; max absolute differences per output.

    ``logits`` / ``boxes`` compare every query. The post-processed outputs are ranked by score, and
    scores that differ by rounding can swap places, so ``scores`` compares the sorted score lists and
    ``detections_agree`` says whether label and box agree for every detection whose score is further than
    1e-5 from its neighbours.
    """
    session = onnx_session(onnx_path)
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    checks = []
    for h, w in sizes:
        image = torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8)
        with torch.no_grad():
            ref = model(model.batch([image.to(model.device)]))
            det = model.postprocess(ref, max_detections=None)[0]
        logits, boxes, scores, labels, xyxy, _ = session.run(None, {"image": image[None].float().numpy()})
        checks.append({
            "size": (h, w),
            "logits": float(np.abs(logits - ref.main.logits.cpu().numpy()).max()),
            "boxes": float(np.abs(boxes - ref.main.boxes.cpu().numpy()).max()),
            "scores": float(np.abs(np.sort(scores[0]) - np.sort(det.scores.cpu().numpy())).max())
            if scores.shape[1] == det.scores.numel() else float("inf"),
            "detections_agree": detections_agree(scores[0], labels[0], xyxy[0], det),
        })
    return checks


def detections_agree(scores: np.ndarray, labels: np.ndarray, boxes: np.ndarray, det: Any,
                     gap: float = 1e-5, box_atol: float = 1e-2) -> bool:
    """Label and box agree for every ONNX detection whose score is unambiguous (no other score within
    ``gap`` in either list), compared with the PyTorch detection ``det`` of the nearest score."""
    ref_scores = det.scores.cpu().numpy()
    ref_labels = det.labels.cpu().numpy()
    ref_boxes = det.boxes.cpu().numpy()
    all_scores = np.concatenate([scores, ref_scores])
    for i, s in enumerate(scores):
        if (np.abs(all_scores - s) < gap).sum() > 2:  # itself + its counterpart; more means a near-tie
            continue
        j = int(np.argmin(np.abs(ref_scores - s)))
        if abs(ref_scores[j] - s) >= gap:
            if s - gap <= ref_scores.min():  # just below the other list's top-K cut
                continue
            return False
        if ref_labels[j] != labels[i] or np.abs(ref_boxes[j] - boxes[i]).max() > box_atol:
            return False
    return True
