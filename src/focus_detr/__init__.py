"""focus-detr: Focus-DETR (ICCV 2023) in pure PyTorch."""

import os as _os

# OpenMP threads that finish their share of an operator wait for the others. By default (libgomp) they spin
# for a while first, holding a core; when other processes want the cores too, the spinning thread steals the
# time the slower threads of its own team need, and every one of the ~1000 parallel operators of a forward
# pass ends late. Measured on a shared 2-core machine (benchmarks/RESULTS.md, "Contention"): 2 threads
# 18.7 s per tiny-preset forward with spinning, 0.22 s with passive waiting. Passive waiting costs a futex
# wake-up (microseconds) per operator on an idle machine. libgomp reads the variable when torch loads it, so
# this takes effect when focus_detr is imported before torch (always for the `focus-detr` command; otherwise
# `openmp.warn_if_threads_spin` warns when the machine looks busy); a value the user set is kept.
from . import openmp as _openmp

WAIT_POLICY_AT_IMPORT = _openmp.record_wait_policy()
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .api import (CheckpointFormatError, CheckpointMismatchError, InferenceOnlyError, PrecisionError,
                  from_pretrained, load, load_official, optimize_for_inference, read_weights_file, save)
from .config import PRESETS, FocusDETRConfig, get_preset, make_config
from .model import Detections, FocusDETR, FocusDETROutputs, SelectionPolicy, build_model
from .viz.draw import draw_detections

__version__ = "0.1.0"

# Too late to set the policy when torch came first: say so when it costs time (the machine looks busy).
_openmp.warn_if_threads_spin(WAIT_POLICY_AT_IMPORT)

__all__ = ["build_model", "load_official", "save", "load", "from_pretrained", "read_weights_file", "PRESETS", "FocusDETRConfig",
           "get_preset", "make_config", "FocusDETR", "FocusDETROutputs", "Detections", "SelectionPolicy",
           "CheckpointFormatError", "CheckpointMismatchError", "draw_detections", "__version__",
           "optimize_for_inference", "PrecisionError", "InferenceOnlyError", "WAIT_POLICY_AT_IMPORT"]
