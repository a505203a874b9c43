"""focus-detr: Focus-DETR (ICCV 2023) in pure PyTorch."""

from .api import (CheckpointFormatError, CheckpointMismatchError, InferenceOnlyError, PrecisionError,
                  from_pretrained, load, load_official, optimize_for_inference, read_weights_file, save)
from .config import PRESETS, FocusDETRConfig, get_preset, make_config
from .model import Detections, FocusDETR, FocusDETROutputs, SelectionPolicy, build_model
from .viz.draw import draw_detections

__version__ = "0.1.0"

__all__ = ["build_model", "load_official", "save", "load", "from_pretrained", "read_weights_file", "PRESETS", "FocusDETRConfig",
           "get_preset", "make_config", "FocusDETR", "FocusDETROutputs", "Detections", "SelectionPolicy",
           "CheckpointFormatError", "CheckpointMismatchError", "draw_detections", "__version__",
           "optimize_for_inference", "PrecisionError", "InferenceOnlyError"]
