"""Export to deployment formats. ONNX: :func:`export_onnx` (needs the optional ``onnx`` + ``onnxscript``
packages) and :class:`OnnxDetector` (needs ``onnxruntime``); see :mod:`focus_detr.export.onnx` and
:mod:`focus_detr.export.runtime`."""

from .onnx import (DEFAULT_OPSET, MAX_SIZE, MIN_SIZE, ExportableFocusDETR, ExportReport, OnnxExportError,
                   default_example_size, export_onnx)
from .runtime import OnnxDetector, compare_with_pytorch

__all__ = ["DEFAULT_OPSET", "MAX_SIZE", "MIN_SIZE", "ExportableFocusDETR", "ExportReport", "OnnxDetector",
           "OnnxExportError", "compare_with_pytorch", "default_example_size", "export_onnx"]
