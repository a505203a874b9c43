"""Public entry points: build, load any weights source, save our self-describing weights.

Every model file goes through :mod:`focus_detr.weights`; the functions here are the short names users call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import FocusDETRConfig
from .convert.official import CheckpointMismatchError, ConversionReport
from .model import FocusDETR, build_model
from .model.optimize import InferenceOnlyError, PrecisionError, optimize_for_inference
from .weights.files import CheckpointFormatError, read_torch_file
from .weights.kinds import WEIGHTS_FORMAT, WEIGHTS_FORMAT_VERSION, check_weights_payload, save_weights


def load_official(checkpoint: str | Path | Mapping[str, Any], preset: str | FocusDETRConfig = "r50_4scale",
                  return_report: bool = False, **overrides: Any):
    """Build ``preset`` and load an official detrex Focus-DETR checkpoint into it (strictly).

    ``checkpoint`` is a path to the official ``.pth`` (a dict with a ``model`` entry), a release zip, or a
    state dict. Raises :class:`~focus_detr.convert.CheckpointMismatchError` naming missing / unexpected /
    mis-shaped keys. Position-embedding settings are not stored in official checkpoints: pick the preset that
    matches the training schedule (``r50_4scale`` = 24/36 epochs, ``r50_4scale_12ep`` = 12 epochs).
    """
    from .weights.kinds import read_official, build_for_state_dict, official_state_dict, read_weights

    if isinstance(checkpoint, (str, os.PathLike)):
        source = str(checkpoint)
        read = read_weights(checkpoint, preset, overrides=overrides)
        if read.report is None:
            raise CheckpointFormatError(f"{source}: a {read.kind} file, not an official checkpoint; use "
                                        "focus_detr.load(path)")
    else:
        source = "official state dict"
        read = read_official(official_state_dict(checkpoint, source), source, preset, overrides, source)
    model = build_for_state_dict(read.cfg, read.state_dict, source, read.report)
    return (model, read.report) if return_report else model


def save(model: FocusDETR, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{format, format_version, config, state_dict, extra, sha256}`` (loadable with
    ``weights_only=True``; the checksum covers config and tensors), atomically. A model from
    :func:`optimize_for_inference` is refused (:class:`InferenceOnlyError`): save the original."""
    from .model.optimize import NO_SAVE_MESSAGE, is_inference_only

    if is_inference_only(model):
        raise InferenceOnlyError(NO_SAVE_MESSAGE)
    return save_weights(model, path, extra)


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Read and verify one of our weights files (the raw payload); raises :class:`CheckpointFormatError`."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        hint = ""
        if isinstance(payload, dict) and "model" in payload:
            hint = (" It looks like an official detrex checkpoint: use load_official(path, preset), "
                    "focus_detr.load(path) (preset guessed) or `focus-detr convert`.")
        raise CheckpointFormatError(f"{path}: not a focus-detr weights file.{hint}")
    check_weights_payload(payload, str(path))
    return payload


def load(source: str | os.PathLike[str], device: str | torch.device = "cpu", preset: str | None = None,
         ema: bool = False, **overrides: Any) -> FocusDETR:
    """A ready model (eval mode) from any weights source: our weights file, a training checkpoint (``ema``:
    its EMA weights), an official checkpoint or release zip (``preset``, else guessed from the keys), a Hugging
    Face folder, a pretrained name (``focus_detr.weights.registry``: downloaded and cached) or a Hub repo id.
    ``overrides`` change run-time settings such as ``batch_mode`` or ``num_detections``."""
    from .weights.kinds import load_model

    return load_model(source, preset, ema, device, **overrides)[0]


def from_pretrained(name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu",
                    preset: str | None = None, **overrides: Any) -> FocusDETR:
    """Like :func:`load`, named as in Hugging Face: ``focus_detr.from_pretrained("focus_detr_r50_4scale_36ep")``
    downloads (once) and caches the official model; a folder written by ``model.save_pretrained`` loads too."""
    return load(name_or_path, device, preset, **overrides)


__all__ = ["build_model", "load_official", "save", "load", "from_pretrained", "read_weights_file",
           "optimize_for_inference", "PrecisionError", "InferenceOnlyError", "read_torch_file", "CheckpointFormatError", "CheckpointMismatchError", "ConversionReport",
           "WEIGHTS_FORMAT", "WEIGHTS_FORMAT_VERSION"]
