"""The Focus-DETR model (depends on ops, layers and backbones only)."""

from .build import build_model
from .detector import FocusDETR
from .outputs import DenoisingOutputs, EncoderTrace, FocusDETROutputs, Predictions
from .postprocess import Detections, postprocess
from .selection import DEFAULT_POLICY, SelectionPolicy

__all__ = ["build_model", "FocusDETR", "FocusDETROutputs", "Predictions", "DenoisingOutputs", "EncoderTrace",
           "Detections", "postprocess", "SelectionPolicy", "DEFAULT_POLICY"]
