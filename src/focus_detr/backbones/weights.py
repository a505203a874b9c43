"""ImageNet initialisation of the backbones from the files the official recipe starts from.

Supported sources (the official code went through detectron2's checkpointer, whose suffix-matching
heuristics did this renaming implicitly; here it is explicit and reported):

* torchvision ResNet ``.pth`` (e.g. ``resnet50-0676ba61.pth``): ``conv1/bn1 -> stem.conv1(.norm)``,
  ``layerK -> res{K+1}``, ``convJ/bnJ -> convJ(.norm)``, ``downsample.0/1 -> shortcut(.norm)``;
  ``fc.*`` and ``num_batches_tracked`` are skipped.
* detectron2 ``.pkl`` as written by detectron2's ``tools/convert-torchvision-to-d2.py``
  (``{"model": {name: ndarray}, "__author__": ..., "matching_heuristics": True}`` or a bare dict) with
  detectron2 names. It is unpickled with a restricted unpickler that can only rebuild numpy arrays and
  plain containers (:func:`focus_detr.weights.files.safe_load_pickle`). Caffe2 MSRA names (``res2_0_branch2a_w``) are recognised and refused: those models
  are ``stride_in_1x1=True`` and expect BGR input, so they do not fit this ResNet.
* official Swin ImageNet ``.pth`` (``{"model": sd}`` or bare): names already match; ``head.*``, the final
  ``norm.*``, ``attn_mask`` and ``relative_position_index`` buffers are skipped (the index is rebuilt
  deterministically). The output norms ``norm{i}`` have no ImageNet counterpart and stay at (1, 0).

Every loader returns a :class:`LoadReport` and raises ``ValueError`` naming the keys when a shape differs.
Loading is non-strict otherwise: missing and unexpected keys are reported, not fatal.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from focus_detr.backbones.resnet import ResNet
from focus_detr.backbones.swin import SwinTransformer
from focus_detr.weights.files import (CheckpointFormatError, read_numpy_pickle, read_torch_file)
from focus_detr.weights.files import UnsafePickleError, safe_load_pickle  # noqa: F401 - re-exported (older imports)


@dataclass
class LoadReport:
    """What a weight loader did.

    loaded:      backbone keys that received a tensor.
    missing:     backbone keys the source did not provide (left at their initial value).
    unexpected:  source keys (after renaming) that have no place in the backbone (not loaded).
    skipped:     source keys dropped on purpose (classifier head, BN counters, attention masks, ...).
    source:      detected source format.
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"{self.source}: loaded {len(self.loaded)}, missing {len(self.missing)}, "
            f"unexpected {len(self.unexpected)}, skipped {len(self.skipped)}"
        ]
        if self.missing:
            lines.append("  missing: " + ", ".join(self.missing))
        if self.unexpected:
            lines.append("  unexpected: " + ", ".join(self.unexpected))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# Backbone keys a source need not provide: rebuilt deterministically at construction.
_DERIVED_BUFFER = re.compile(r"(^|\.)relative_position_index$")


def _apply_renamed(backbone: nn.Module, renamed: Mapping[str, Tensor], skipped: list[str], source: str) -> LoadReport:
    """Copy ``renamed`` (already in backbone names) into ``backbone``; check shapes first, load nothing on
    a mismatch."""
    target = backbone.state_dict()
    mismatched = [
        f"{k}: source {tuple(v.shape)} vs backbone {tuple(target[k].shape)}"
        for k, v in renamed.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if mismatched:
        raise ValueError(f"{source}: shape mismatch for {len(mismatched)} key(s):\n  " + "\n  ".join(mismatched))
    matched = {k: v for k, v in renamed.items() if k in target}
    report = LoadReport(
        source=source,
        loaded=[k for k in target if k in matched],
        missing=[k for k in target if k not in matched and not _DERIVED_BUFFER.search(k)],
        unexpected=[k for k in renamed if k not in target],
        skipped=list(skipped),
    )
    # strict=False because a partial source is allowed (reported above); load_state_dict copies in place
    # and casts to each tensor's dtype.
    backbone.load_state_dict(matched, strict=False)
    return report


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def _unwrap_checkpoint(obj: Any) -> dict[str, Any]:
    """``{"model": sd}`` / ``{"state_dict": sd}`` / ``{"blobs": sd}`` (Caffe2 pickles) / bare ``sd`` -> ``sd``
    with a ``module.`` prefix removed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a dict of tensors (or {{'model': ...}}), got {type(obj).__name__}")
    for key in ("model", "state_dict", "blobs"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    return _strip_prefix(dict(obj), "module.")


def _require(backbone: nn.Module, cls: type, what: str) -> None:
    if not isinstance(backbone, cls):
        raise ValueError(f"{what} weights need a {cls.__name__} backbone, got {type(backbone).__name__}")


# --------------------------------------------------------------------------------------------------
# ResNet: torchvision names

# (pattern, replacement) applied with re.sub to each torchvision key; the first that matches wins.
_TORCHVISION_RULES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"^conv1\.(.+)$"), lambda m: f"stem.conv1.{m[1]}"),
    (re.compile(r"^bn1\.(.+)$"), lambda m: f"stem.conv1.norm.{m[1]}"),
    (re.compile(r"^layer([1-4])\.(\d+)\.conv([1-3])\.(.+)$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.{m[4]}"),
    (re.compile(r"^layer([1-4])\.(\d+)\.bn([1-3])\.(.+)$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.0\.(.+)$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.{m[3]}"),
    (re.compile(r"^layer([1-4])\.(\d+)\.downsample\.1\.(.+)$"),
     lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]
_TORCHVISION_SKIP = re.compile(r"^fc\.|(^|\.)num_batches_tracked$")


def torchvision_resnet_to_detectron2(state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a torchvision ResNet state dict to detectron2 names.

    Returns ``(renamed, skipped)``; keys no rule knows are kept under their own name (they will show up
    as unexpected).
    """
    renamed: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in state_dict.items():
        if _TORCHVISION_SKIP.search(key):
            skipped.append(key)
            continue
        new = key
        for pattern, repl in _TORCHVISION_RULES:
            m = pattern.match(key)
            if m:
                new = repl(m)
                break
        renamed[new] = value
    return renamed, skipped


def load_torchvision_resnet(backbone: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load a torchvision ResNet state dict (``{"model": sd}`` or bare) into a :class:`ResNet`.

    The torchvision bottleneck has its stride on the 3x3 conv, like this ResNet, so no weight moves
    between convs. BN ``weight/bias/running_mean/running_var`` go to the FrozenBN buffers.
    """
    _require(backbone, ResNet, "torchvision ResNet")
    renamed, skipped = torchvision_resnet_to_detectron2(_unwrap_checkpoint(state_dict))
    return _apply_renamed(backbone, renamed, skipped, "torchvision ResNet")


# --------------------------------------------------------------------------------------------------
# ResNet: detectron2 names (.pkl from convert-torchvision-to-d2, or a torch dict with the same names)

_D2_SKIP = re.compile(r"(^|\.)fc\.|^fc1000_|(^|\.)num_batches_tracked$")
_MSRA_NAME = re.compile(r"^(conv1_w|res_conv1_bn_[sb]|res\d+_\d+_branch\w+)$")


def load_detectron2_resnet_state_dict(
    backbone: nn.Module, state_dict: Mapping[str, Any], source: str = "detectron2 ResNet"
) -> LoadReport:
    """Load a dict with detectron2 ResNet names (``stem.conv1.weight``, ``res2.0.conv1.norm.weight``, ...);
    values may be tensors or numpy arrays.

    A ``backbone.bottom_up.`` or ``backbone.`` prefix (detectron2 detector checkpoints) is removed.
    Caffe2 MSRA names are refused with an explanation.
    """
    _require(backbone, ResNet, "detectron2 ResNet")
    sd = _unwrap_checkpoint(state_dict)
    msra = [k for k in sd if _MSRA_NAME.match(k)]
    if msra:
        raise ValueError(
            f"{source}: Caffe2/MSRA parameter names (e.g. {msra[:3]}) are not supported: those ResNets put "
            "the stride on the 1x1 conv (stride_in_1x1=True) and expect BGR 0-255 input, unlike this "
            "torchvision-style ResNet. Convert a torchvision checkpoint instead."
        )
    renamed: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in sd.items():
        name = key
        for prefix in ("backbone.bottom_up.", "backbone."):
            if name.startswith(prefix):
                name = name[len(prefix):]
                break
        if _D2_SKIP.search(name):
            skipped.append(key)
            continue
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, Tensor):
            skipped.append(key)  # metadata such as "__author__" in a bare dict
            continue
        renamed[name] = value
    return _apply_renamed(backbone, renamed, skipped, source)


def load_detectron2_resnet_pkl(backbone: nn.Module, path: str | Path) -> LoadReport:
    """Load a detectron2 ``.pkl`` ResNet (e.g. ``R-50.pkl`` made by ``convert-torchvision-to-d2.py``).

    The file is ``{"model": {name: ndarray}, ...}`` or a bare ``{name: ndarray}``; it is unpickled with
    :func:`safe_load_pickle`.
    """
    path = Path(path)
    obj = read_numpy_pickle(path)
    return load_detectron2_resnet_state_dict(backbone, obj, source=f"detectron2 pkl {path.name}")


# --------------------------------------------------------------------------------------------------
# Swin ImageNet .pth

_SWIN_SKIP = re.compile(r"^head\.|^norm\.|(^|\.)attn_mask$|(^|\.)relative_position_index$")


def load_swin_imagenet(backbone: nn.Module, state_dict: Mapping[str, Tensor]) -> LoadReport:
    """Load an official Swin ImageNet checkpoint (``{"model": sd}`` or bare) into a :class:`SwinTransformer`.

    Skips the classifier ``head.*``, the final ``norm.*`` (the backbone has per-output ``norm{i}``
    instead, left at their init), ``attn_mask`` buffers and ``relative_position_index`` (rebuilt). A
    relative-position table of another window size is a shape mismatch (no interpolation here).
    """
    _require(backbone, SwinTransformer, "Swin ImageNet")
    renamed: dict[str, Tensor] = {}
    skipped: list[str] = []
    for key, value in _unwrap_checkpoint(state_dict).items():
        if _SWIN_SKIP.search(key):
            skipped.append(key)
        else:
            renamed[key] = value
    return _apply_renamed(backbone, renamed, skipped, "Swin ImageNet")


# --------------------------------------------------------------------------------------------------
# Format sniffing


def detect_state_dict_format(state_dict: Mapping[str, Any]) -> str:
    """``"swin"``, ``"torchvision_resnet"`` or ``"detectron2_resnet"`` from the key names; ``ValueError``
    otherwise."""
    keys = list(state_dict)
    if any(k.startswith("patch_embed.") for k in keys) or any(re.match(r"^layers\.\d+\.blocks\.", k) for k in keys):
        return "swin"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
        return "torchvision_resnet"
    if any(re.match(r"^(backbone\.(bottom_up\.)?)?(stem\.conv1|res[2-5]\.\d+)\.", k) for k in keys):
        return "detectron2_resnet"
    if any(_MSRA_NAME.match(k) for k in keys):
        return "detectron2_resnet"  # refused with an explanation by the loader
    preview = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
    raise ValueError(f"unrecognised backbone weight format ({len(keys)} keys: {preview})")


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> LoadReport:
    """Load ImageNet weights from ``path`` into ``backbone``, detecting the format.

    ``path`` may also be ``imagenet`` (the file the official recipe starts this backbone from) or a backbone
    name of :mod:`focus_detr.weights.registry` (e.g. ``resnet50_imagenet``): downloaded once and cached.
    ``.pkl``: detectron2 pickle (restricted unpickler). Other files: a torch file loaded with
    ``weights_only=True``, then dispatched by key names (torchvision ResNet, Swin, or a dict with detectron2
    ResNet names). Every failure is a ``ValueError`` whose message is one line naming the file.
    """
    path = _resolve_named_weights(backbone, path)
    name = path.name.lower()
    if not name.endswith((".pkl", ".pth", ".pt", ".pth.tar", ".bin")):
        raise CheckpointFormatError(f"{path}: unknown weight file type {path.name!r}: expected .pkl (detectron2) or "
                                    ".pth/.pt (torch)")
    if name.endswith(".pkl"):
        return _one_line(path, lambda: load_detectron2_resnet_pkl(backbone, path))
    obj = read_torch_file(path, what="backbone weights file")

    def dispatch() -> LoadReport:
        state_dict = _unwrap_checkpoint(obj)
        kind = detect_state_dict_format(state_dict)
        if kind == "swin":
            return load_swin_imagenet(backbone, state_dict)
        if kind == "torchvision_resnet":
            return load_torchvision_resnet(backbone, state_dict)
        return load_detectron2_resnet_state_dict(backbone, state_dict, source=f"detectron2-named {path.name}")

    return _one_line(path, dispatch)


def _one_line(path: Path, load: Callable[[], LoadReport]) -> LoadReport:
    """Run a loader; its errors become one ``CheckpointFormatError`` line that starts with the file."""
    try:
        return load()
    except CheckpointFormatError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError) as e:
        text = " ".join(str(e).split())
        raise CheckpointFormatError(f"{path}: {text[:400]}") from None


def _resolve_named_weights(backbone: nn.Module, path: str | Path) -> Path:
    """A file path as given, or the cached file of ``imagenet`` / a registry backbone name."""
    candidate = Path(path)
    if candidate.exists() or str(path) != candidate.name or "." in str(path):
        return candidate
    from ..weights import registry
    from ..weights.download import fetch_file

    if str(path) == "imagenet":
        try:
            entry = registry.backbone_entry_for(_backbone_config(backbone))
        except ValueError as e:
            raise CheckpointFormatError(f"imagenet: {e}") from None
    else:
        entry = registry.find(str(path))
        if entry is None or entry.kind != "backbone":
            raise CheckpointFormatError(f"{path}: no such backbone weights file, and not a backbone name ("
                                        f"imagenet, {', '.join(m.name for m in registry.all_models() if m.kind == 'backbone')})")
    return fetch_file(entry)


def _backbone_config(backbone: nn.Module):
    """The config fields that decide which ImageNet file fits ``backbone``, read from its tensors."""
    from ..config import ResNetConfig, SwinConfig

    sd = backbone.state_dict()
    stage3 = r"^layers\.2\.blocks\.(\d+)\." if isinstance(backbone, SwinTransformer) else r"^res4\.(\d+)\."
    blocks = 1 + max((int(m.group(1)) for k in sd if (m := re.match(stage3, k))), default=-1)
    if isinstance(backbone, ResNet):
        stem, width = int(sd["stem.conv1.weight"].shape[0]), int(sd["res2.0.conv1.weight"].shape[0])
        depth = {6: 50, 23: 101, 36: 152}.get(blocks, 0)
        return ResNetConfig(depth=depth or 50, stem_channels=stem, base_width=width,
                            num_blocks=None if depth else (blocks,) * 4)
    if isinstance(backbone, SwinTransformer):
        table = sd["layers.0.blocks.0.attn.relative_position_bias_table"]
        window = int(round((table.shape[0] ** 0.5 + 1) / 2))
        return SwinConfig(embed_dim=int(sd["patch_embed.proj.weight"].shape[0]), depths=(2, 2, blocks, 2),
                          window_size=window)
    raise ValueError(f"no ImageNet weights are known for a {type(backbone).__name__} backbone")
