"""Bounds and types of a model config read from a file, checked before anything is built.

A weights file, training checkpoint or ``config.json`` carries the model config as a plain dict. A crafted
or damaged one (``embed_dim = 10**7``, a string where a number belongs, a list of a million layers) must be
refused with one line before a single tensor is allocated. :func:`config_from_file_dict` checks every field
against the dataclass defaults' types and the bounds below, then builds the typed config.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import (DecoderConfig, DenoisingConfig, EncoderConfig, FocusDETRConfig, PositionEmbeddingConfig,
                      ResNetConfig, SwinConfig, config_from_dict, validate_config)
from .files import CheckpointFormatError

# Sizes and counts: (lowest, highest). Generous for any real Focus-DETR, small enough that a model built from
# them fits in memory. Integer fields not listed must lie in [0, _DEFAULT_INT_MAX].
_INT_BOUNDS: dict[str, tuple[int, int]] = {
    "num_classes": (1, 100_000), "embed_dim": (2, 4096), "num_levels": (1, 8), "num_detections": (1, 100_000),
    "test_short_side": (16, 8192), "test_max_size": (16, 16384),
    "backbone.depth": (18, 152), "backbone.freeze_at": (0, 5), "backbone.stem_channels": (1, 1024),
    "backbone.base_width": (1, 1024), "backbone.num_blocks": (1, 64),
    "backbone.embed_dim": (1, 1024), "backbone.depths": (1, 64), "backbone.num_heads": (1, 128),
    "backbone.window_size": (1, 64), "backbone.pretrain_img_size": (16, 4096), "backbone.out_indices": (0, 7),
    "encoder.num_layers": (1, 64), "encoder.num_heads": (1, 64), "encoder.num_points": (1, 64),
    "encoder.ffn_dim": (1, 65536), "encoder.oesm_topk": (1, 100_000),
    "decoder.num_layers": (1, 64), "decoder.num_heads": (1, 64), "decoder.num_points": (1, 64),
    "decoder.ffn_dim": (1, 65536), "decoder.num_queries": (1, 10_000),
    "denoising.num_queries": (0, 10_000),
}
_DEFAULT_INT_MAX = 1_000_000
_FLOAT_MAX = 1e12
_MAX_SEQUENCE = 64  # entries of a tuple field (depths, cascade, out_features, ...)
_MAX_CLASS_NAMES = 100_000
_MAX_NAME_CHARS = 1000

_SECTIONS: dict[str, type] = {"position_embedding": PositionEmbeddingConfig, "encoder": EncoderConfig,
                              "decoder": DecoderConfig, "denoising": DenoisingConfig}


class _Invalid(Exception):
    pass


def _check_number(name: str, value: Any, want: type, nullable: bool) -> None:
    if value is None and nullable:
        return
    if isinstance(value, bool) and want is not bool:
        raise _Invalid(f"{name} must be a number, not {value!r}")
    if want is bool:
        if not isinstance(value, bool):
            raise _Invalid(f"{name} must be true or false, not {_show(value)}")
        return
    if want is int:
        if not isinstance(value, int):
            raise _Invalid(f"{name} must be an integer, not {_show(value)}")
        lo, hi = _INT_BOUNDS.get(name, (0, _DEFAULT_INT_MAX))
        if not lo <= value <= hi:
            raise _Invalid(f"{name} = {_show(value)} is outside the accepted range {lo}..{hi}")
        return
    if want is float:
        if not isinstance(value, (int, float)):
            raise _Invalid(f"{name} must be a number, not {_show(value)}")
        if not math.isfinite(float(value)) or abs(float(value)) > _FLOAT_MAX:
            raise _Invalid(f"{name} = {_show(value)} is not a finite number of sensible size")
        return
    if want is str:
        if not isinstance(value, str) or len(value) > _MAX_NAME_CHARS:
            raise _Invalid(f"{name} must be a short string, not {_show(value)}")
        return


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_field(name: str, value: Any, default: Any) -> None:
    """Type and bounds of ``value`` against the field's default (which fixes the expected type)."""
    if name == "class_names":
        if value is None:
            return
        if not isinstance(value, (list, tuple)) or len(value) > _MAX_CLASS_NAMES:
            raise _Invalid(f"class_names must be a list of at most {_MAX_CLASS_NAMES} strings, not {_show(value)}")
        for item in value:
            if not isinstance(item, str) or len(item) > _MAX_NAME_CHARS:
                raise _Invalid(f"class_names must hold strings, found {_show(item)}")
        return
    if isinstance(default, tuple) or (default is None and name.endswith("num_blocks")):
        if value is None and default is None:
            return
        if not isinstance(value, (list, tuple)) or not 0 < len(value) <= _MAX_SEQUENCE:
            raise _Invalid(f"{name} must be a list of 1..{_MAX_SEQUENCE} values, not {_show(value)}")
        sample = default[0] if default else 0
        want = bool if isinstance(sample, bool) else int if isinstance(sample, int) else \
            float if isinstance(sample, float) else str
        for item in value:
            _check_number(name, item, want, nullable=False)
        return
    if default is None:  # optional number or string (query_nms_iou, value_source)
        if value is not None and not isinstance(value, (int, float, str)) or isinstance(value, bool):
            raise _Invalid(f"{name} must be empty, a number or a string, not {_show(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise _Invalid(f"{name} = {value!r} is not finite")
        return
    want = bool if isinstance(default, bool) else int if isinstance(default, int) else \
        float if isinstance(default, float) else str
    _check_number(name, value, want, nullable=False)


def _check_section(prefix: str, data: Any, cls: type, extra_allowed: tuple[str, ...] = ()) -> None:
    if not isinstance(data, dict):
        raise _Invalid(f"{prefix or 'config'} must be a mapping, not {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if not isinstance(key, str):
            raise _Invalid(f"{prefix or 'config'} has a non-string key {_show(key)}")
        if key in extra_allowed:
            continue
        if key not in fields:
            raise _Invalid(f"unknown config field {prefix}{key!r}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        _check_field(f"{prefix}{key}", value, default)


def check_config_dict(data: Any) -> None:
    """Raise ``ValueError`` (one line, naming the field) when ``data`` is not a sound config dict."""
    try:
        if not isinstance(data, dict):
            raise _Invalid(f"the model config must be a mapping, not {_show(data)}")
        top = {k: v for k, v in data.items() if k not in ("backbone", *_SECTIONS)}
        _check_section("", top, FocusDETRConfig)
        backbone = data.get("backbone")
        if not isinstance(backbone, dict):
            raise _Invalid(f"config backbone must be a mapping, not {_show(backbone)}")
        kind = backbone.get("type", "resnet")
        if kind not in ("resnet", "swin"):
            raise _Invalid(f"config backbone.type must be 'resnet' or 'swin', not {_show(kind)}")
        _check_section("backbone.", backbone, SwinConfig if kind == "swin" else ResNetConfig, extra_allowed=("type",))
        for name, cls in _SECTIONS.items():
            if name in data:
                _check_section(f"{name}.", data[name], cls)
    except _Invalid as e:
        raise ValueError(str(e)) from None


def config_from_file_dict(data: Any, source: str) -> FocusDETRConfig:
    """The typed config of a dict read from ``source``; :class:`CheckpointFormatError` naming ``source`` and
    the field when a type or bound is wrong."""
    try:
        check_config_dict(data)
        cfg = config_from_dict(data)
        validate_config(cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointFormatError(f"{source}: invalid model config: {e}") from None
    return cfg


def parameter_lower_bound(cfg: FocusDETRConfig) -> int:
    """A cheap lower bound of the number of values in a model built from ``cfg`` (the largest matrices only)."""
    d = cfg.embed_dim
    enc, dec = cfg.encoder, cfg.decoder
    total = enc.num_layers * 2 * d * enc.ffn_dim + dec.num_layers * (2 * d * dec.ffn_dim + 4 * d * d)
    total += dec.num_layers * d * cfg.num_classes + dec.num_queries * d
    b = cfg.backbone
    if isinstance(b, SwinConfig):
        total += sum(12 * (b.embed_dim * 2**i) ** 2 * n for i, n in enumerate(b.depths))
    else:
        blocks = b.num_blocks or {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}.get(b.depth, (1, 1, 1, 1))
        total += sum(9 * (b.base_width * 2**i) ** 2 * n for i, n in enumerate(blocks))
    return int(total)


def check_size(cfg: FocusDETRConfig, state_dict: dict, source: str) -> None:
    """Refuse a config that describes far more values than the file's tensors hold (a crafted config would
    otherwise make us allocate memory the file never paid for)."""
    held = sum(int(v.numel()) for v in state_dict.values())
    needed = parameter_lower_bound(cfg)
    if needed > 2 * held + 1_000_000:
        raise CheckpointFormatError(f"{source}: the stored config describes at least {needed:,} values but the file "
                                    f"holds {held:,}; the config does not belong to these weights")


__all__ = ["check_config_dict", "config_from_file_dict", "parameter_lower_bound", "check_size"]
