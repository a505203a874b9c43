"""Pretrained models by name: the official Focus-DETR checkpoints and the ImageNet backbones of the recipe.

The detector entries are every checkpoint linked from the official Focus-DETR README (the table in
IDEA-Research/detrex ``projects/focus_detr/README.md``), with its link exactly as given there, the preset that
loads it and its official COCO val2017 box AP. Most are zips from the ``linxid/Focus-DETR-mindspore`` GitHub
releases, whose contents could not be inspected when this table was written: a zip holding one checkpoint
under any name is accepted (see :func:`focus_detr.weights.kinds.zip_checkpoint_member`). The README's
oddities are kept and noted rather than "fixed". Position-embedding settings are not stored in official
checkpoints, so the preset matters: 24/36-epoch ResNet models use temperature 20 / offset 0
(``r50_4scale``), 12-epoch ResNet and all Swin models 10000 / -0.5.

No sha256 is known for any official file (none is published): the first download's digest is recorded in the
cache index and every later use is checked against it (see :mod:`focus_detr.weights.download`).

Extra entries (a site's own models, a test server) can be added with a JSON file named by
``$FOCUS_DETR_REGISTRY``: ``{"models": [{"name": ..., "url": ..., "preset": ..., "coco_ap": ...}, ...]}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

OFFICIAL_README = "https://github.com/IDEA-Research/Focus-DETR (README, table 'Main Results with Pretrained Models')"
_MS = "https://github.com/linxid/Focus-DETR-mindspore/releases/download/Focus-DETR/"


@dataclass(frozen=True)
class PretrainedModel:
    """One downloadable model.

    name:      what users type (``focus-detr predict NAME ...``).
    url:       the official link ("" when the official README gives none: listed as unavailable).
    preset:    the preset that loads it (None: guessed from the file's keys, with ``pe`` fixing the position
               embedding); ignored for files that store their config (our own weights files).
    coco_ap:   official COCO val2017 box AP (None for backbones).
    kind:      "detector" or "backbone" (ImageNet weights for ``--backbone-weights``).
    epochs, backbone: for the table.
    note:      oddities of the official link or config.
    sha256:    expected digest of the downloaded file when published (None: trust on first download).
    """

    name: str
    url: str
    preset: str | None
    coco_ap: float | None = None
    kind: str = "detector"
    epochs: int | None = None
    backbone: str = ""
    note: str = ""
    sha256: str | None = None

    @property
    def available(self) -> bool:
        return bool(self.url)

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1] if self.url else ""


_SWIN_T_36_NOTE = ("the official README's Swin-T 36-epoch row links a file named ..._12ep.pth; taken as given "
                   "(its AP column says 52.5, the 12-epoch row's zip 50.0)")

MODELS: tuple[PretrainedModel, ...] = (
    PretrainedModel("focus_detr_r50_4scale_12ep", _MS + "focus_detr_r50_4scale_12ep.zip", "r50_4scale_12ep", 48.8,
                    epochs=12, backbone="R-50"),
    PretrainedModel("focus_detr_r50_4scale_24ep", _MS + "focus_detr_r50_4scale_24ep.zip", "r50_4scale", 50.3,
                    epochs=24, backbone="R-50"),
    PretrainedModel("focus_detr_r50_4scale_36ep", _MS + "focus_detr_r50_4scale_36ep_v3.zip", "r50_4scale", 50.4,
                    epochs=36, backbone="R-50", note="the official link names the file ..._36ep_v3.zip"),
    PretrainedModel("focus_detr_r101_4scale_12ep", _MS + "focus_detr_r101_4scale_12ep.zip", "r101_4scale_12ep", 50.8,
                    epochs=12, backbone="R-101"),
    PretrainedModel("focus_detr_r101_4scale_24ep", _MS + "focus_detr_r101_4scale_24ep.zip", "r101_4scale", 51.2,
                    epochs=24, backbone="R-101"),
    PretrainedModel("focus_detr_r101_4scale_36ep", _MS + "focus_detr_r101_4scale_36ep_v2.zip", None, 51.4,
                    epochs=36, backbone="R-101",
                    note="the official r101 36-epoch config builds a ResNet-50 (depth not set): the backbone is "
                         "taken from the file's keys, with the 36-epoch position embedding; the link names "
                         "..._36ep_v2.zip"),
    PretrainedModel("focus_detr_swin_tiny_224_4scale_12ep", _MS + "focus_detr_swin_tiny_224_4scale_12ep.zip",
                    "swin_tiny_224_4scale", 50.0, epochs=12, backbone="Swin-T-224"),
    PretrainedModel("focus_detr_swin_tiny_224_4scale_24ep", _MS + "focus_detr_swin_tiny_224_4scale_24ep.zip",
                    "swin_tiny_224_4scale", 51.2, epochs=24, backbone="Swin-T-224"),
    PretrainedModel("focus_detr_swin_tiny_224_4scale_36ep",
                    "https://github.com/IDEA-Research/detrex-storage/releases/download/v0.1.1/"
                    "focus_detr_swin_tiny_224_4scale_12ep.pth",
                    "swin_tiny_224_4scale", 52.5, epochs=36, backbone="Swin-T-224", note=_SWIN_T_36_NOTE),
    PretrainedModel("focus_detr_swin_tiny_224_4scale_22k_36ep", "", "swin_tiny_224_4scale", 53.2, epochs=36,
                    backbone="Swin-T-224 (IN-22k)",
                    note="unavailable: the official README's link is empty (and its config link points to the "
                         "IN-1k config)"),
    PretrainedModel("focus_detr_swin_base_384_4scale_22k_36ep", _MS + "focus_detr_swin_base_384_4scale_22k_36ep.pth",
                    "swin_base_384_4scale", 56.2, epochs=36, backbone="Swin-B-384 (IN-22k)"),
    PretrainedModel("focus_detr_swin_large_384_4scale_22k_36ep", "", "swin_large_384_4scale", 56.3, epochs=36,
                    backbone="Swin-L-384 (IN-22k)", note="unavailable: the official README's link is empty"),
    # ImageNet backbones the official recipe starts from (spec section 11); `--backbone-weights imagenet`
    # picks the one matching the preset's backbone.
    PretrainedModel("resnet50_imagenet", "https://download.pytorch.org/models/resnet50-0676ba61.pth", None,
                    kind="backbone", backbone="R-50", note="torchvision ResNet-50 V1 (IMAGENET1K_V1)"),
    PretrainedModel("resnet101_imagenet", "https://download.pytorch.org/models/resnet101-63fe2227.pth", None,
                    kind="backbone", backbone="R-101", note="torchvision ResNet-101 V1 (IMAGENET1K_V1)"),
    PretrainedModel("swin_tiny_224_imagenet",
                    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth",
                    None, kind="backbone", backbone="Swin-T-224", note="official Swin ImageNet-1k"),
    PretrainedModel("swin_base_384_imagenet22k",
                    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                    "swin_base_patch4_window12_384_22k.pth",
                    None, kind="backbone", backbone="Swin-B-384 (IN-22k)", note="official Swin ImageNet-22k"),
    PretrainedModel("swin_large_384_imagenet22k",
                    "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                    "swin_large_patch4_window12_384_22k.pth",
                    None, kind="backbone", backbone="Swin-L-384 (IN-22k)", note="official Swin ImageNet-22k"),
)

def _extra_models() -> list[PretrainedModel]:
    path = os.environ.get("FOCUS_DETR_REGISTRY")
    if not path:
        return []
    try:
        data = json.loads(Path(path).read_text())
        allowed = {f.name for f in fields(PretrainedModel)}
        models = []
        for item in data["models"]:
            unknown = set(item) - allowed
            if unknown:
                raise ValueError(f"unknown field(s) {sorted(unknown)}")
            models.append(PretrainedModel(**item))
        return models
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} (FOCUS_DETR_REGISTRY): not a registry file ({type(e).__name__}: {e})") from None


def all_models() -> list[PretrainedModel]:
    """Built-in entries, then those of ``$FOCUS_DETR_REGISTRY`` (which replace built-ins of the same name)."""
    extra = _extra_models()
    names = {m.name for m in extra}
    return [m for m in MODELS if m.name not in names] + extra


def names() -> list[str]:
    return [m.name for m in all_models()]


def find(name: str) -> PretrainedModel | None:
    for m in all_models():
        if m.name == name:
            return m
    return None


def get(name: str) -> PretrainedModel:
    m = find(name)
    if m is None:
        import difflib

        close = difflib.get_close_matches(name, names(), n=3, cutoff=0.5)
        raise ValueError(f"{name}: not a pretrained model name" + (f"; did you mean {', '.join(close)}?" if close
                                                                   else " (`focus-detr models` lists them)"))
    return m


def fetch(name: str, progress: bool = True) -> Path:
    """The cached weights file (our format) of detector ``name``: downloaded, unpacked and converted on first
    use, verified against the cache index on every use. See :mod:`focus_detr.weights.download`."""
    from .download import fetch_converted

    return fetch_converted(get(name), progress=progress)


def backbone_entry_for(backbone_cfg: Any) -> PretrainedModel:
    """The ImageNet weights the official recipe starts ``backbone_cfg`` from (``--backbone-weights imagenet``)."""
    from ..config import PRESETS, ResNetConfig, SwinConfig

    if isinstance(backbone_cfg, ResNetConfig):
        standard = backbone_cfg.num_blocks is None and backbone_cfg.stem_channels == 64 and backbone_cfg.base_width == 64
        if standard and backbone_cfg.depth in (50, 101):
            return get(f"resnet{backbone_cfg.depth}_imagenet")
    if isinstance(backbone_cfg, SwinConfig):
        for preset, name in (("swin_tiny_224_4scale", "swin_tiny_224_imagenet"),
                             ("swin_base_384_4scale", "swin_base_384_imagenet22k"),
                             ("swin_large_384_4scale", "swin_large_384_imagenet22k")):
            ref = PRESETS[preset].backbone
            if (ref.embed_dim, ref.depths[2], ref.window_size) == (  # type: ignore[union-attr]
                    backbone_cfg.embed_dim, backbone_cfg.depths[2], backbone_cfg.window_size):
                return get(name)
    raise ValueError(f"no ImageNet weights are published for this backbone ({type(backbone_cfg).__name__} of a size no "
                     "official recipe uses); pass a weights file to --backbone-weights, or train it from scratch")


def as_dict(m: PretrainedModel) -> dict[str, Any]:
    return {**asdict(m), "available": m.available}


__all__ = ["PretrainedModel", "MODELS", "all_models", "names", "find", "get", "fetch", "backbone_entry_for"]
