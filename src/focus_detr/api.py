"""Public entry points: build, load official checkpoints, save / load our self-describing weights."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import FocusDETRConfig, config_from_dict, config_to_dict, make_config
from .convert.official import (CheckpointMismatchError, ConversionReport, convert_official_state_dict,
                               extract_state_dict, load_converted)
from .model import FocusDETR, build_model

WEIGHTS_FORMAT = "focus-detr-weights"
WEIGHTS_FORMAT_VERSION = 1


class CheckpointFormatError(ValueError):
    """A file that is not a readable focus-detr checkpoint (truncated, foreign, corrupted)."""


def load_official(checkpoint: str | Path | Mapping[str, Any], preset: str | FocusDETRConfig = "r50_4scale",
                  return_report: bool = False, **overrides: Any):
    """Build ``preset`` and load an official detrex Focus-DETR checkpoint into it (strictly).

    ``checkpoint`` is a path to the official ``.pth`` (a dict with a ``model`` entry) or a state dict.
    Raises :class:`~focus_detr.convert.CheckpointMismatchError` naming missing / unexpected / mis-shaped keys.
    Position-embedding settings are not stored in official checkpoints: pick the preset that matches the
    training schedule (``r50_4scale`` = 24/36 epochs, ``r50_4scale_12ep`` = 12 epochs).
    """
    model = build_model(preset, **overrides)
    state = extract_state_dict(checkpoint)
    converted, report = convert_official_state_dict(state, model.cfg)
    source = str(checkpoint) if isinstance(checkpoint, (str, Path)) else "official state dict"
    load_converted(model, converted, report, source=source)
    model.eval()
    return (model, report) if return_report else model


def _state_digest(state: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(model: FocusDETR, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{format, version, config, state_dict, sha256}`` (loadable with ``weights_only=True``), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": WEIGHTS_FORMAT,
        "format_version": WEIGHTS_FORMAT_VERSION,
        "config": config_to_dict(model.cfg),
        "state_dict": state,
        "sha256": _state_digest(state),
        "extra": dict(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        import os
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def read_torch_file(path: str | Path, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, for every kind of checkpoint we read (weights files,
    training checkpoints, official checkpoints); a missing or unreadable file raises
    :class:`CheckpointFormatError` naming it (``what`` names the missing thing: "no such <what>")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(f"{path}: no such {what}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, random bytes, ...
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise CheckpointFormatError(f"{path}: not a readable checkpoint, the file is truncated or not a PyTorch "
                                    f"file ({type(e).__name__}: {first})") from None


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Read and verify one of our weights files; raises :class:`CheckpointFormatError` with the reason."""
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        hint = ""
        if isinstance(payload, dict) and "model" in payload:
            hint = " It looks like an official detrex checkpoint: use load_official(path, preset) or `focus-detr convert`."
        raise CheckpointFormatError(f"{path}: not a focus-detr weights file.{hint}")
    if payload.get("format_version", 0) > WEIGHTS_FORMAT_VERSION:
        raise CheckpointFormatError(f"{path}: format version {payload.get('format_version')} is newer than this "
                                    f"focus-detr understands ({WEIGHTS_FORMAT_VERSION}); upgrade focus-detr")
    digest = payload.get("sha256")
    if digest is not None and _state_digest(payload["state_dict"]) != digest:
        raise CheckpointFormatError(f"{path}: checksum mismatch, the file is corrupted")
    return payload


def load(path: str | Path, device: str | torch.device = "cpu", **overrides: Any) -> FocusDETR:
    """Rebuild the model stored by :func:`save` (config + weights); ``overrides`` may change run-time settings
    such as ``batch_mode`` or ``num_detections``."""
    payload = read_weights_file(path)
    cfg = config_from_dict(payload["config"])
    if overrides:
        cfg = make_config(cfg, **overrides)
    model = build_model(cfg)
    load_converted(model, payload["state_dict"], source=str(path))
    return model.to(device).eval()


__all__ = ["build_model", "load_official", "save", "load", "read_weights_file", "CheckpointFormatError",
           "CheckpointMismatchError", "ConversionReport"]
