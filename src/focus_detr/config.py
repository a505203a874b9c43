"""Typed, frozen configuration of a Focus-DETR model and the named presets.

A config is plain data: :func:`focus_detr.model.build.build_model` turns it into modules, and
checkpoints store it as a dict (:func:`config_to_dict` / :func:`config_from_dict`) so a model can be
rebuilt from the file alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

EncoderMode = Literal["focus", "dense", "sparse"]
OesmScore = Literal["logit_product", "prob_product"]
BatchMode = Literal["invariant", "official"]


@dataclass(frozen=True)
class ResNetConfig:
    """detectron2 ResNet (BasicStem + bottleneck stages, FrozenBN everywhere).

    ``freeze_at=1`` freezes the stem only (the official setting); ``freeze_at=k`` also freezes res2..res{k}.
    """

    depth: int = 50  # 50, 101 or 152 (bottleneck blocks); ``num_blocks`` overrides the block counts
    freeze_at: int = 1
    out_features: tuple[str, ...] = ("res3", "res4", "res5")
    stem_channels: int = 64
    base_width: int = 64  # res2 bottleneck width; res2 output = 4 * base_width
    num_blocks: tuple[int, ...] | None = None  # overrides the depth table (used by the tiny preset)
    # "frozen_bn" is the official setting (ImageNet-initialised backbones); "gn" (GroupNorm) trains stably
    # from scratch and is what the tiny preset uses.
    norm: Literal["frozen_bn", "gn"] = "frozen_bn"


@dataclass(frozen=True)
class SwinConfig:
    """detectron2 Swin Transformer (out_indices (1, 2, 3) -> features p1, p2, p3)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    pretrain_img_size: int = 224
    drop_path_rate: float = 0.1
    out_indices: tuple[int, ...] = (1, 2, 3)


@dataclass(frozen=True)
class PositionEmbeddingConfig:
    """Sine position embedding (DETR style). 12-epoch ResNet and Swin checkpoints use 10000 / -0.5,
    24/36-epoch ResNet checkpoints use 20 / 0.0 (not stored in checkpoints: set it from the preset).
    The embedding has ``embed_dim / 2`` features per axis."""

    temperature: float = 10000.0
    offset: float = -0.5
    normalize: bool = True
    scale: float = 6.283185307179586  # 2 * pi
    eps: float = 1e-6


@dataclass(frozen=True)
class EncoderConfig:
    """The token-sparse encoder.

    mode:
        ``focus``  -- the paper: foreground token selector + cascade + OESM dual attention.
        ``dense``  -- DINO: every token, deformable self-attention with value = current memory.
        ``sparse`` -- Sparse-DETR-like: keep-ratio token selection, no cascade, no OESM.
    """

    mode: EncoderMode = "focus"
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    keep_ratio: float = 0.5
    cascade: tuple[float, ...] = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)
    oesm_topk: int = 300
    oesm_score: OesmScore = "logit_product"
    # Deformable attention values: the official focus encoder samples the original neck features in every
    # layer ("features"); DINO and Sparse DETR sample the current memory ("memory").
    value_source: Literal["features", "memory"] | None = None  # None -> features for focus, memory otherwise

    def resolved_value_source(self) -> str:
        if self.value_source is not None:
            return self.value_source
        return "features" if self.mode == "focus" else "memory"


@dataclass(frozen=True)
class DecoderConfig:
    num_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_queries: int = 900
    # Distinct query selection (DDQ, Zhang et al. 2023), off (None) in the official model: before the
    # two-stage top-``num_queries``, proposals overlapping a better-scored proposal by more than this IoU are
    # moved behind all others, so each object starts with about one query. Young models then learn the
    # one-to-one assignment much faster (fewer duplicate detections); the demo recipe uses 0.5.
    query_nms_iou: float | None = None


@dataclass(frozen=True)
class DenoisingConfig:
    """Contrastive denoising (DINO). ``num_queries=0`` disables it."""

    num_queries: int = 100
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 1.0


@dataclass(frozen=True)
class FocusDETRConfig:
    backbone: ResNetConfig | SwinConfig = field(default_factory=ResNetConfig)
    position_embedding: PositionEmbeddingConfig = field(default_factory=PositionEmbeddingConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    num_classes: int = 80
    embed_dim: int = 256
    num_levels: int = 4
    # Detections kept by post-processing (top-k over queries x classes).
    num_detections: int = 300
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    # Test-time resize (shorter side, longer-side cap), as the official data config.
    test_short_side: int = 800
    test_max_size: int = 1333
    # "invariant": proper padding masks and per-image token budgets (an image gives the same result alone
    # or in any batch). "official": the official code's batch-dependent behaviour (eval-mode all-zero masks,
    # batch-maximum token budgets, batch-wide minimum for padded scores), for parity with its outputs.
    batch_mode: BatchMode = "invariant"
    class_names: tuple[str, ...] | None = None

    def replace(self, **changes: Any) -> "FocusDETRConfig":
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------------
# Presets, named after the official config files.

COCO_CLASS_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)

# The 24/36-epoch ResNet configs change the position embedding; 12-epoch and Swin configs keep the default.
PE_RESNET_LONG = PositionEmbeddingConfig(temperature=20.0, offset=0.0)
PE_DEFAULT = PositionEmbeddingConfig(temperature=10000.0, offset=-0.5)


def _coco(**kw: Any) -> FocusDETRConfig:
    return FocusDETRConfig(class_names=COCO_CLASS_NAMES, **kw)


PRESETS: dict[str, FocusDETRConfig] = {
    # The released R50/R101 checkpoints with the best AP are the 36-epoch ones (temperature 20, offset 0).
    "r50_4scale": _coco(backbone=ResNetConfig(depth=50), position_embedding=PE_RESNET_LONG),
    "r50_4scale_12ep": _coco(backbone=ResNetConfig(depth=50), position_embedding=PE_DEFAULT),
    "r101_4scale": _coco(backbone=ResNetConfig(depth=101), position_embedding=PE_RESNET_LONG),
    "r101_4scale_12ep": _coco(backbone=ResNetConfig(depth=101), position_embedding=PE_DEFAULT),
    "swin_tiny_224_4scale": _coco(
        backbone=SwinConfig(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                            pretrain_img_size=224, drop_path_rate=0.1),
        position_embedding=PE_DEFAULT),
    "swin_small_224_4scale": _coco(
        backbone=SwinConfig(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
                            pretrain_img_size=224, drop_path_rate=0.2),
        position_embedding=PE_DEFAULT),
    "swin_base_384_4scale": _coco(
        backbone=SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
                            pretrain_img_size=384, drop_path_rate=0.2),
        position_embedding=PE_DEFAULT),
    "swin_large_384_4scale": _coco(
        backbone=SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
                            pretrain_img_size=384, drop_path_rate=0.2),
        position_embedding=PE_DEFAULT),
    # Small model for CPU tests and demos: a narrow 1-block-per-stage ResNet, width 64, 2 + 2 layers.
    "tiny": FocusDETRConfig(
        class_names=COCO_CLASS_NAMES,
        backbone=ResNetConfig(depth=50, stem_channels=16, base_width=8, num_blocks=(1, 1, 1, 1), freeze_at=0,
                              norm="gn"),
        position_embedding=PE_DEFAULT,
        encoder=EncoderConfig(num_layers=2, num_heads=4, num_points=2, ffn_dim=128, cascade=(1.0, 0.6),
                              oesm_topk=50),
        decoder=DecoderConfig(num_layers=2, num_heads=4, num_points=2, ffn_dim=128, num_queries=50),
        denoising=DenoisingConfig(num_queries=20),
        num_classes=80, embed_dim=64, num_detections=100,
        test_short_side=320, test_max_size=512,
    ),
}


class ConfigError(ValueError):
    """A preset or model option that does not exist: bad input (the command line reports it in one line)."""


class UnknownPresetError(ConfigError, KeyError):
    """No preset of that name (also a KeyError: a failed lookup in :data:`PRESETS`)."""

    __str__ = Exception.__str__  # the message itself, not KeyError's quoted repr of it


class UnknownOptionError(ConfigError, TypeError):
    """No config field of that name (also a TypeError, as for an unknown keyword argument)."""


def get_preset(name: str) -> FocusDETRConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None


def _apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Apply ``{"encoder_mode": "dense", "num_classes": 3, "encoder.keep_ratio": 0.3}``-style overrides.

    Top-level fields are set directly; ``section.field`` or ``section_field`` reaches into a sub-config.
    """
    top_fields = {f.name for f in dataclasses.fields(cfg)}
    direct: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key in top_fields:
            direct[key] = value
            continue
        section, sep, sub = key.partition(".")
        if not sep:
            for name in sorted(top_fields, key=len, reverse=True):
                if key.startswith(name + "_"):
                    section, sub = name, key[len(name) + 1:]
                    break
            else:
                raise UnknownOptionError(f"unknown model option {key!r}; valid top-level options: {sorted(top_fields)}")
        sub_cfg = getattr(cfg, section, None)
        if not dataclasses.is_dataclass(sub_cfg):
            raise UnknownOptionError(f"unknown model option {key!r}")
        if sub not in {f.name for f in dataclasses.fields(sub_cfg)}:
            raise UnknownOptionError(f"unknown model option {key!r}: {type(sub_cfg).__name__} has no field {sub!r}")
        nested.setdefault(section, {})[sub] = value
    for section, values in nested.items():
        direct[section] = dataclasses.replace(getattr(cfg, section), **values)
    if "num_classes" in direct and "class_names" not in direct and cfg.class_names is not None:
        if len(cfg.class_names) != direct["num_classes"]:
            direct["class_names"] = None
    return dataclasses.replace(cfg, **direct)


def make_config(preset: str | FocusDETRConfig, **overrides: Any) -> FocusDETRConfig:
    cfg = get_preset(preset) if isinstance(preset, str) else preset
    cfg = _apply_overrides(cfg, overrides) if overrides else cfg
    validate_config(cfg)
    return cfg


def validate_config(cfg: FocusDETRConfig) -> None:
    enc = cfg.encoder
    if enc.mode not in ("focus", "dense", "sparse"):
        raise ValueError(f"encoder.mode must be focus, dense or sparse, got {enc.mode!r}")
    if enc.mode == "focus" and len(enc.cascade) != enc.num_layers:
        raise ValueError(f"encoder.cascade has {len(enc.cascade)} ratios but the encoder has {enc.num_layers} layers")
    if not 0.0 < enc.keep_ratio <= 1.0:
        raise ValueError(f"encoder.keep_ratio must be in (0, 1], got {enc.keep_ratio}")
    iou = cfg.decoder.query_nms_iou
    if iou is not None and (isinstance(iou, bool) or not isinstance(iou, (int, float)) or not 0.0 < iou < 1.0):
        raise ValueError(f"decoder.query_nms_iou must be None (off) or an IoU in (0, 1), got {iou!r}")
    if cfg.num_levels != 4:
        raise ValueError("only 4 feature levels (strides 8/16/32/64) are supported")
    if cfg.embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {cfg.embed_dim}")
    if cfg.class_names is not None and len(cfg.class_names) != cfg.num_classes:
        raise ValueError(f"class_names has {len(cfg.class_names)} names but num_classes is {cfg.num_classes}")


# --------------------------------------------------------------------------------------------------
# Serialisation: plain dicts (safe inside torch.load(weights_only=True) checkpoints).

_SECTION_TYPES = {
    "position_embedding": PositionEmbeddingConfig,
    "encoder": EncoderConfig,
    "decoder": DecoderConfig,
    "denoising": DenoisingConfig,
}


def config_to_dict(cfg: FocusDETRConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["backbone"]["type"] = "swin" if isinstance(cfg.backbone, SwinConfig) else "resnet"
    return d


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value


def config_from_dict(d: dict[str, Any]) -> FocusDETRConfig:
    d = dict(d)
    backbone = dict(d.pop("backbone"))
    kind = backbone.pop("type", "resnet")
    backbone_cls = SwinConfig if kind == "swin" else ResNetConfig
    kwargs: dict[str, Any] = {"backbone": backbone_cls(**{k: _tuplify(v) for k, v in backbone.items()})}
    for name, cls in _SECTION_TYPES.items():
        if name in d:
            kwargs[name] = cls(**{k: _tuplify(v) for k, v in d.pop(name).items()})
    kwargs.update({k: _tuplify(v) for k, v in d.items()})
    return FocusDETRConfig(**kwargs)
