"""ONNX export of Focus-DETR with a dynamic input size.

:class:`ExportableFocusDETR` is the model's own forward for **one un-padded image** (batch 1, eval mode, the
:data:`~focus_detr.model.batching.UNPADDED` batch semantics, the reference deformable-attention core) followed
by the model's own top-K detection selection: nothing of the model is restated here. Level sizes come from the
feature maps' symbolic shapes and the token budgets are graph values, so tokens, budgets and queries follow
the image size. A ``batch_mode="official"`` model is exported with the batch-invariant single-image maths.

Input ``image [1, 3, H, W]`` float32 RGB 0..255 (resized by the test-time rule; each side in
:data:`MIN_SIZE`..:data:`MAX_SIZE`). Outputs: ``logits [1, Q, C]`` and ``boxes [1, Q, 4]`` (final decoder
layer, sigmoid cxcywh) and the top ``K = min(num_detections, Q * C)`` detections: ``scores [1, K]``
(descending), ``labels [1, K]``, ``boxes_xyxy [1, K, 4]`` (pixels of ``image``, clipped), ``query_indices
[1, K]``. The config is stored in the metadata (``focus_detr_config``); :class:`OnnxDetector` runs the file.
Needs ``onnx`` + ``onnxscript`` (torch's dynamo-based exporter) and ``onnxruntime`` to run it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
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

import torch
from torch import Tensor, nn

from ..model.batching import UNPADDED
from ..model.detector import FocusDETR
from ..model.postprocess import boxes_to_pixels, select_detections
from ..ops import ms_deform_attn as msda
from ..ops.images import ImageBatch

#: ONNX opset of the graph (GridSample needs >= 16).
DEFAULT_OPSET = 18
#: Smallest input side: every one of the 4 levels (stride 64) keeps >= 1 cell and every layer >= 1 token.
MIN_SIZE = 65
#: Largest input side declared to the exporter (the test-time resize gives <= 1333).
MAX_SIZE = 4096
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["logits", "boxes", "scores", "labels", "boxes_xyxy", "query_indices"]


class OnnxExportError(RuntimeError):
    """Export is not possible for this model or environment (the message says why)."""


def require(module: str, purpose: str) -> Any:
    """Import an optional dependency or explain how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{purpose} needs the optional package {module!r}: pip install 'focus-detr[onnx]' "
                          f"(or pip install onnx onnxscript onnxruntime)") from e


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
    from ..ops.images import resized_shape

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
        from .runtime import compare_with_pytorch  # runtime.py imports this module

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
