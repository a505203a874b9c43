"""Inference-time speed knobs: how many tokens the Focus-DETR encoder updates.

The foreground budget of an image is ``int(keep_ratio * valid_tokens) + 1`` and encoder layer ``l`` updates
``int(cascade[l] * budget)`` tokens. Both are read from ``model.cfg.encoder`` at every forward pass, so they can be
turned on a trained model without touching its weights: a lower keep ratio is faster (fewer tokens through the
deformable attention, OESM and FFN of every layer) and usually less accurate. The weights were trained at one
ratio (the paper's 0.5); ratios far from it are outside what the model has seen.

    from focus_detr.model.knobs import with_keep_ratio
    model = with_keep_ratio(model, 0.3)                       # same weights, 30 % foreground budget
    model = with_keep_ratio(model, 0.5, cascade=(1.0, 1.0))   # no cascade (tiny preset: 2 layers)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from .detector import FocusDETR


def _check_ratio(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number in (0, 1], got {value!r}")
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")
    return float(value)


def check_keep_ratio(keep_ratio: object, cascade: Sequence[float] | None = None, num_layers: int | None = None,
                     mode: str = "focus") -> tuple[float, tuple[float, ...] | None]:
    """Validate a keep ratio (and cascade) for a model of ``mode`` with ``num_layers`` encoder layers.

    Returns ``(keep_ratio, cascade)`` as float / tuple of floats; raises ``ValueError`` with a one-line message.
    """
    if mode == "dense":
        raise ValueError("keep_ratio: this model's encoder is dense (every token in every layer); only focus and "
                         "sparse models select tokens")
    ratio = _check_ratio(keep_ratio, "keep_ratio")
    if cascade is None:
        return ratio, None
    if mode != "focus":
        raise ValueError(f"cascade: a {mode} encoder has no cascade (every layer updates the whole budget)")
    if isinstance(cascade, (str, bytes)) or not isinstance(cascade, Sequence):
        raise ValueError(f"cascade must be a sequence of ratios in (0, 1], one per encoder layer, got {cascade!r}")
    values = tuple(_check_ratio(c, f"cascade[{i}]") for i, c in enumerate(cascade))
    if num_layers is not None and len(values) != num_layers:
        raise ValueError(f"cascade has {len(values)} ratios but the encoder has {num_layers} layers")
    return ratio, values


def with_keep_ratio(model: FocusDETR, keep_ratio: float, cascade: Sequence[float] | None = None) -> FocusDETR:
    """Set the encoder's foreground keep ratio (and optionally the per-layer cascade) of ``model`` in place.

    Replaces ``model.cfg`` (a frozen dataclass) with a copy whose ``encoder.keep_ratio`` / ``encoder.cascade``
    are the new values; the weights are untouched and the change applies from the next forward pass (also to
    ``predict``, ``detect`` and ONNX export, which read the same config). Returns ``model`` for chaining.

    Raises ``ValueError`` (one line) for a ratio outside (0, 1], a cascade of the wrong length or with a ratio
    outside (0, 1], a cascade on a sparse model, or any keep ratio on a dense model.
    """
    enc = model.cfg.encoder
    ratio, values = check_keep_ratio(keep_ratio, cascade, enc.num_layers, enc.mode)
    changes: dict[str, object] = {"keep_ratio": ratio}
    if values is not None:
        changes["cascade"] = values
    new_encoder = dataclasses.replace(enc, **changes)
    model.cfg = dataclasses.replace(model.cfg, encoder=new_encoder)
    # The encoder module keeps its own copy of the encoder config (it reads the OESM settings from it): keep the
    # two in step so that nothing can see the old ratio.
    if getattr(model.encoder, "cfg", None) is not None:
        model.encoder.cfg = new_encoder
    return model
