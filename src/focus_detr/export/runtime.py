"""Running an exported ONNX file with onnxruntime (:class:`OnnxDetector`) and checking it against the
PyTorch model (:func:`compare_with_pytorch`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .onnx import OUTPUT_NAMES, check_size, require

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime

    from ..model.detector import FocusDETR


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


class OnnxDetector:
    """Runs an exported file with onnxruntime: ``OnnxDetector("model.onnx").predict(image) -> Detections``.

    The config stored in the file gives the test-time resize and the class names; boxes are returned in
    pixels of the original image, as :meth:`FocusDETR.predict` does.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..config import config_from_dict

        onnx = require("onnx", "reading an exported ONNX file's metadata")
        self.path = Path(path)
        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if "focus_detr_config" not in meta:
            raise ValueError(f"{path}: not exported by focus-detr (no focus_detr_config metadata)")
        self.cfg = config_from_dict(json.loads(meta["focus_detr_config"]))
        self.session = onnx_session(path)

    def prepare(self, image: Any) -> tuple[np.ndarray, tuple[int, int]]:
        """Image (path, PIL, array) -> (``[1, 3, h, w]`` float32 network input, original ``(H, W)``)."""
        from ..data.image_io import to_rgb_array
        from ..model.preprocess import preprocess

        network_input, original = preprocess(to_rgb_array(image), self.cfg)  # as FocusDETR.predict
        check_size(*network_input.shape[1:])
        return np.ascontiguousarray(network_input.numpy()[None], dtype=np.float32), original

    def run(self, network_input: np.ndarray) -> dict[str, np.ndarray]:
        """Raw outputs (see the module docstring) for a prepared ``[1, 3, h, w]`` input."""
        return dict(zip(OUTPUT_NAMES, self.session.run(None, {"image": network_input})))

    def predict(self, image: Any, score_threshold: float = 0.0, max_detections: int | None = None):
        """Detections in original-image pixels (a :class:`~focus_detr.model.Detections`)."""
        from ..model import Detections

        x, (orig_h, orig_w) = self.prepare(image)
        out = self.run(x)
        h, w = x.shape[2:]
        scale = np.array([orig_w / w, orig_h / h, orig_w / w, orig_h / h], dtype=np.float32)
        boxes = out["boxes_xyxy"][0] * scale
        keep = (out["scores"][0] >= score_threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if max_detections is not None:
            keep &= np.arange(keep.size) < max_detections
        labels = out["labels"][0][keep]
        names = self.cfg.class_names
        return Detections(torch.from_numpy(boxes[keep]), torch.from_numpy(out["scores"][0][keep]),
                          torch.from_numpy(labels.astype(np.int64)),
                          [names[i] if names is not None else str(i) for i in labels.tolist()],
                          torch.from_numpy(out["query_indices"][0][keep].astype(np.int64)))
