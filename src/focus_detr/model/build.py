"""Config -> modules."""

from __future__ import annotations

from typing import Any

from ..backbones import build_backbone
from ..config import FocusDETRConfig, make_config
from .detector import FocusDETR


def build_model(preset: str | FocusDETRConfig = "r50_4scale", **overrides: Any) -> FocusDETR:
    """Build a randomly initialised Focus-DETR.

    ``preset`` is a name from :data:`focus_detr.config.PRESETS` or a config; ``overrides`` change fields,
    e.g. ``encoder_mode="dense"``, ``num_classes=3``, ``encoder.keep_ratio=0.3`` (as ``**{"encoder.keep_ratio": 0.3}``),
    ``batch_mode="official"``.
    """
    cfg = make_config(preset, **overrides)
    return FocusDETR(cfg, build_backbone(cfg.backbone))
