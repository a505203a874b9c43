"""ONNX export of Focus-DETR with a dynamic input size.

:class:`ExportableFocusDETR` is the model's own forward for **one un-padded image** (batch 1, eval mode,
:data:`~focus_detr.model.batching.UNPADDED` batch semantics, the deformable-attention reference core),
followed by the model's own detection selection; nothing of the model is restated here. The stages read level
sizes from the feature maps' (symbolic) shapes and the token budgets become graph values, so the token
budgets, the number of tokens and of queries follow the image size. A ``batch_mode="official"`` model is
exported with the batch-invariant single-image maths (equal to the official mode up to float rounding).

Inputs and outputs (``B = 1``; ``H``, ``W`` dynamic, each between :data:`MIN_SIZE` and :data:`MAX_SIZE`):

* ``image [1, 3, H, W]`` float32 RGB 0..255, already resized by the test-time rule;
* ``logits [1, Q, C]``, ``boxes [1, Q, 4]``: the final decoder layer (sigmoid cxcywh, normalised);
* ``scores [1, K]`` (descending), ``labels [1, K]``, ``boxes_xyxy [1, K, 4]`` (pixels of ``image``, clipped),
  ``query_indices [1, K]``: the top ``K = min(num_detections, Q * C)`` detections.

Scaling to the original photo and the score threshold are left to the caller (:class:`OnnxDetector`). The
config is stored in the file's metadata (``focus_detr_config``). The exporter is torch's dynamo-based
``torch.onnx.export(..., dynamo=True)`` (optional packages ``onnx`` and ``onnxscript``; ``onnxruntime`` runs
the result).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..model.batching import UNPADDED
from ..model.detector import FocusDETR
from ..model.postprocess import boxes_to_pixels, select_detections
from ..ops import ms_deform_attn as msda
from ..ops.images import ImageBatch
from .verify import compare_with_pytorch, onnx_session, require

#: ONNX opset the graph is written for (GridSample needs >= 16; TopK with a graph-computed K is opset >= 10).
DEFAULT_OPSET = 18
#: Smallest input side: every one of the 4 levels (stride 64) keeps >= 1 cell and every layer >= 1 token.
MIN_SIZE = 65
#: Largest input side declared to the exporter (the test-time resize gives <= 1333).
MAX_SIZE = 4096
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["logits", "boxes", "scores", "labels", "boxes_xyxy", "query_indices"]


class OnnxExportError(RuntimeError):
    """Export is not possible for this model or environment (the message says why)."""


class ExportableFocusDETR(nn.Module):
    """``image [1, 3, H, W]`` (RGB 0..255, resized) -> ``(logits, boxes, scores, labels, boxes_xyxy,
    query_indices)``: :meth:`FocusDETR.forward` on the un-padded image, then the top-K detections."""

    def __init__(self, model: FocusDETR) -> None:
        super().__init__()
        if model.cfg.encoder.mode != "focus":
            raise OnnxExportError(f"ONNX export supports encoder mode 'focus' only, this model uses "
                                  f"{model.cfg.encoder.mode!r}")
        self.model = model
        for name, values in (("pixel_mean", model.cfg.pixel_mean), ("pixel_std", model.cfg.pixel_std)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        h, w = image.shape[2], image.shape[3]
        sizes = torch.tensor([[h, w]], device=image.device)
        batch = ImageBatch((image - self.pixel_mean) / self.pixel_std,
                           torch.zeros(1, h, w, dtype=torch.bool, device=image.device), sizes)
        out = m(batch, policy=m.default_policy, batching=UNPADDED)
        scores, labels, queries, xyxy = select_detections(out.main.logits, out.main.boxes, m.cfg.num_detections,
                                                          None, m.default_policy)
        return out.main.logits, out.main.boxes, scores, labels, boxes_to_pixels(xyxy, sizes), queries


@dataclass
class ExportReport:
    """What :func:`export_onnx` did: the file, the opset, how long it took and the verification results."""

    path: Path
    opset: int
    example_size: tuple[int, int]
    seconds: float
    size_bytes: int
    # One entry per verification size: {"size": (h, w), "logits": max |diff|, "boxes": ..., "scores": ...}
    checks: list[dict[str, Any]] = field(default_factory=list)


def default_example_size(cfg: Any) -> tuple[int, int]:
    """The network-input size of a 480 x 640 photo after the model's test-time resize (a typical input)."""
    from ..ops.image_io import resized_shape

    return resized_shape(480, 640, cfg.test_short_side, cfg.test_max_size)


def export_onnx(model: FocusDETR, path: str | os.PathLike[str], opset: int = DEFAULT_OPSET,
                example_size: tuple[int, int] | None = None,
                verify_sizes: Sequence[tuple[int, int]] | None = None) -> ExportReport:
    """Export ``model`` to ``path`` as an ONNX graph with a dynamic image size (see the module docstring).

    ``example_size`` is the ``(H, W)`` traced (default: :func:`default_example_size`). With
    ``verify_sizes`` (and onnxruntime installed), the file is run on random images of those sizes and
    compared with the PyTorch model; the differences are in the report (nothing is asserted here).
    """
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch's dynamo-based exporter)")
    from ..config import config_to_dict

    start = time.perf_counter()
    cpu_model = copy.deepcopy(model).cpu().eval()
    h, w = example_size or default_example_size(cpu_model.cfg)
    check_size(h, w)
    example = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 255.0
    dims = {2: torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE), 3: torch.export.Dim("width", min=MIN_SIZE,
                                                                                            max=MAX_SIZE)}
    log = io.StringIO()  # the exporter narrates every step; kept for errors only
    previous = msda.current_implementation()
    msda.select_implementation("reference")  # plain tensor ops (the fast core is a custom autograd Function)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log), _quiet_loggers():
            program = torch.onnx.export(
                ExportableFocusDETR(cpu_model).eval(), (example,), dynamo=True, dynamic_shapes={"image": dims},
                input_names=INPUT_NAMES, output_names=OUTPUT_NAMES, opset_version=opset, verbose=False,
                custom_translation_table={torch.ops.aten.sort.stable: _onnx_sort_stable})
    except Exception as e:  # noqa: BLE001 - re-raised with the exporter's own log attached
        tail = "\n".join(log.getvalue().strip().splitlines()[-15:])
        raise OnnxExportError(f"torch.onnx.export failed: {type(e).__name__}: {str(e)[:2000]}\n{tail}") from e
    finally:
        msda.select_implementation(previous)
    assert program is not None
    program.model.metadata_props["focus_detr_config"] = json.dumps(config_to_dict(cpu_model.cfg))
    program.model.metadata_props["focus_detr_outputs"] = ",".join(OUTPUT_NAMES)
    program.model.metadata_props["focus_detr_input"] = "image [1, 3, H, W] float32 RGB 0..255, resized"
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(out, external_data=False)
    report = ExportReport(out, opset, (h, w), 0.0, out.stat().st_size)
    if verify_sizes:
        report.checks = compare_with_pytorch(cpu_model, out, verify_sizes)
    report.seconds = time.perf_counter() - start
    return report


def _onnx_sort_stable(self: Any, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
    """ONNX for ``aten.sort.stable`` (the stable top-k of the batch-invariant policy), which torch's ONNX
    library does not cover: a full-length ``TopK``, whose ties go to the lower index (a stable sort)."""
    from onnxscript import opset18 as op

    dim_size = op.Reshape(op.Gather(op.Shape(self), dim, axis=0), op.Constant(value_ints=[1]))
    return op.TopK(self, dim_size, axis=dim, largest=descending, sorted=True)


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch._dynamo",
                                                "torch.export", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_size(h: int, w: int) -> None:
    """Raise ``ValueError`` unless ``h x w`` is an input size the exported graph takes."""
    if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
        raise ValueError(f"the exported graph takes inputs of {MIN_SIZE}..{MAX_SIZE} pixels per side, got {h}x{w}")


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
        from ..ops.image_io import resize_shortest_edge, to_rgb_array

        array = to_rgb_array(image)
        resized = resize_shortest_edge(array, self.cfg.test_short_side, self.cfg.test_max_size)
        check_size(*resized.shape[:2])
        return np.ascontiguousarray(resized.transpose(2, 0, 1)[None], dtype=np.float32), array.shape[:2]

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
