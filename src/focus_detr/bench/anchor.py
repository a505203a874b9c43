"""Optional anchor: Hugging Face transformers' Deformable DETR (two-stage, box refinement, 4 scales, ResNet-50).

What a user might pick instead of Focus-DETR. Built from a config with random weights: its backbone is
transformers' own ``ResNetBackbone`` with the ResNet-50 layout (bottleneck blocks ``[3, 4, 6, 3]``, widths
``256..2048``, FrozenBatchNorm like ours), so nothing is downloaded (no timm, no hub; ``HF_HUB_OFFLINE=1`` is
set while building). Other settings are transformers' defaults for this architecture (the
``SenseTime/deformable-detr-with-box-refine-two-stage`` layout): 6+6 layers, 256 channels, FFN 1024, 8 heads,
4 points, 300 proposals.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

ANCHOR_NAME = "hf_deformable_detr"


def anchor_unavailable_reason() -> str | None:
    """None when transformers can build the anchor, else a message saying why it is skipped."""
    try:
        import transformers  # noqa: F401
        from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig  # noqa: F401
    except ImportError as e:
        return (f"Hugging Face transformers is not installed ({e}); `pip install transformers` (without letting it "
                f"change torch) to benchmark the Deformable DETR anchor")
    return None


def build_anchor(num_classes: int = 80, seed: int = 0) -> nn.Module:
    """Randomly initialised two-stage Deformable DETR with a real ResNet-50 backbone (no weights downloaded)."""
    reason = anchor_unavailable_reason()
    if reason:
        raise ImportError(reason)
    import transformers
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    backbone = ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                            layer_type="bottleneck", out_features=["stage2", "stage3", "stage4"])
    kwargs: dict[str, Any] = dict(backbone_config=backbone, num_feature_levels=4, two_stage=True,
                                  with_box_refine=True, num_labels=num_classes)
    if int(transformers.__version__.split(".")[0]) < 5:
        kwargs.update(use_timm_backbone=False, use_pretrained_backbone=False)
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        torch.manual_seed(seed)
        model = DeformableDetrForObjectDetection(DeformableDetrConfig(**kwargs))
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    return model.eval()


def describe_anchor(model: nn.Module) -> dict[str, Any]:
    """Configuration facts for the report, including proof that the backbone is a full ResNet-50."""
    cfg = model.config
    backbone = model.model.backbone.model
    bb_cfg = getattr(backbone, "config", None)
    convs = sum(1 for m in backbone.modules() if isinstance(m, nn.Conv2d))
    return {
        "name": ANCHOR_NAME,
        "class": type(model).__name__,
        "transformers_version": __import__("transformers").__version__,
        "backbone_class": type(backbone).__name__,
        "backbone_depths": list(getattr(bb_cfg, "depths", [])),
        "backbone_layer_type": getattr(bb_cfg, "layer_type", None),
        "backbone_conv_layers": convs,  # ResNet-50: 1 stem + 16 blocks x 3 + 4 projection shortcuts = 53
        "backbone_params": sum(p.numel() for p in backbone.parameters()),
        "params": sum(p.numel() for p in model.parameters()),
        "two_stage": cfg.two_stage, "with_box_refine": cfg.with_box_refine,
        "num_feature_levels": cfg.num_feature_levels, "encoder_layers": cfg.encoder_layers,
        "decoder_layers": cfg.decoder_layers, "encoder_ffn_dim": cfg.encoder_ffn_dim,
        "decoder_ffn_dim": cfg.decoder_ffn_dim, "d_model": cfg.d_model,
        "num_proposals": cfg.two_stage_num_proposals, "weights": "random init (nothing downloaded)",
    }


def anchor_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Submodules timed separately: backbone (ResNet-50 + FrozenBN), encoder, decoder."""
    return {"backbone": model.model.backbone, "encoder": model.model.encoder, "decoder": model.model.decoder}


def anchor_inputs(pixel_values: torch.Tensor, padding_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' inputs from our normalised batch: ``pixel_mask`` is 1 on real pixels."""
    return {"pixel_values": pixel_values, "pixel_mask": (~padding_mask).long()}
