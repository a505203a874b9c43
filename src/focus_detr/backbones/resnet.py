"""detectron2's ResNet (``BasicStem`` + bottleneck stages), with detectron2's parameter names.

Module names follow detectron2 so the official checkpoint keys map 1:1 once the ``backbone.`` prefix is
stripped::

    stem.conv1.weight                      [64, 3, 7, 7]
    stem.conv1.norm.{weight,bias,running_mean,running_var}
    res{2..5}.{k}.conv{1,2,3}.weight       (+ .norm.*)
    res{2..5}.0.shortcut.weight            (+ .norm.*)   first block of every stage

The bottleneck puts its stride on the 3x3 conv (``stride_in_1x1=False``, the torchvision "V1.5" layout
that the official torchvision-initialised models use). Every stride-2 op maps a size ``n`` to
``ceil(n / 2)``, e.g. 800x1333 -> res3 100x167, res4 50x84, res5 25x42.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from focus_detr.backbones.base import Backbone
from focus_detr.config import ResNetConfig
from focus_detr.layers.frozen_bn import FrozenBatchNorm2d, fold_frozen_batch_norm

# Bottleneck blocks per stage (res2, res3, res4, res5).
RESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STAGE_NAMES: tuple[str, ...] = ("res2", "res3", "res4", "res5")
STAGE_STRIDES: dict[str, int] = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def gn_num_groups(channels: int) -> int:
    """GroupNorm group count for ``channels``: at most 32 groups and at least 4 channels per group.

    32 groups is the usual choice for wide layers; the narrow layers of the tiny preset (8, 16 channels)
    would otherwise get 1-2 channels per group, whose statistics are too noisy. The result always
    divides ``channels``.
    """
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def make_norm(norm: str, channels: int) -> nn.Module:
    """``"frozen_bn"`` -> :class:`FrozenBatchNorm2d` (eps 1e-5); ``"gn"`` -> ``nn.GroupNorm``."""
    if norm == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(gn_num_groups(channels), channels)
    raise ValueError(f"unknown ResNet norm {norm!r}; expected 'frozen_bn' or 'gn'")


class Conv2dNorm(nn.Conv2d):
    """A bias-free ``nn.Conv2d`` that owns its normalisation as a ``.norm`` child (conv -> norm).

    It subclasses ``nn.Conv2d`` (rather than wrapping one) so the conv weight is ``<name>.weight`` and the
    norm is ``<name>.norm.*``, exactly detectron2's key layout. No activation: callers apply ReLU.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, out_channels, H', W']``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        padding: int,
        norm: str,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.norm = make_norm(norm, out_channels)
        # detectron2's c2_msra_fill: He init with fan_out, as in the original Caffe2 ResNets.
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))

    def fold_norm(self) -> bool:
        """Fold a :class:`FrozenBatchNorm2d` into this convolution's weight and a new bias, for inference.

        Afterwards ``norm`` is an ``nn.Identity`` and the layer computes the same function with one op
        instead of two (exact up to float rounding; see :func:`fold_frozen_batch_norm`). The state dict
        changes (a ``bias``, no ``norm.*``), so a folded model is no longer a detectron2-layout checkpoint.
        Returns False (and changes nothing) for a trainable norm such as GroupNorm.
        """
        if not isinstance(self.norm, FrozenBatchNorm2d):
            return False
        weight, bias = fold_frozen_batch_norm(self.weight.detach(), None if self.bias is None else self.bias.detach(),
                                              self.norm)
        self.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(bias, requires_grad=self.weight.requires_grad)
        self.norm = nn.Identity()
        return True


class BasicStem(nn.Module):
    """7x7 stride-2 conv + norm + ReLU, then 3x3 stride-2 max-pool: ``[B, 3, H, W]`` ->
    ``[B, C, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2)]`` (stride 4)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = Conv2dNorm(in_channels, out_channels, kernel_size=7, stride=2, padding=3, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand), each conv followed by its norm; ReLU after the first
    two; the (projected) shortcut is added before the final ReLU.

    ``shortcut`` exists only when the input and output differ in channels or stride (the first block of
    each stage), matching detectron2.

    Shapes: ``[B, in_channels, H, W]`` -> ``[B, out_channels, ceil(H/stride), ceil(W/stride)]``.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        stride: int,
        norm: str,
    ) -> None:
        super().__init__()
        if in_channels != out_channels or stride != 1:
            self.shortcut: Conv2dNorm | None = Conv2dNorm(
                in_channels, out_channels, kernel_size=1, stride=stride, padding=0, norm=norm
            )
        else:
            self.shortcut = None
        # stride_in_1x1=False: the stride sits on the 3x3 conv.
        self.conv1 = Conv2dNorm(in_channels, bottleneck_channels, kernel_size=1, stride=1, padding=0, norm=norm)
        self.conv2 = Conv2dNorm(
            bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride, padding=1, norm=norm
        )
        self.conv3 = Conv2dNorm(bottleneck_channels, out_channels, kernel_size=1, stride=1, padding=0, norm=norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        identity = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + identity)


class ResNet(Backbone):
    """detectron2 ResNet backbone.

    Args:
        depth: 50, 101 or 152; selects the block counts unless ``num_blocks`` is given.
        out_features: subset of ``res2..res5``; stages deeper than the deepest requested one are not
            built (as in detectron2, so no parameter goes without gradient).
        freeze_at: 0 freezes nothing; 1 freezes the stem (official setting); ``k >= 2`` also freezes
            ``res2..res{k}``. Freezing sets ``requires_grad=False`` on the parameters (FrozenBN has none).
        stem_channels: stem output channels (64 for the standard ResNets).
        base_width: bottleneck width of res2 (64 standard); doubles every stage. A stage's output has
            ``4 x`` its bottleneck width (res2 256 ... res5 2048 for the standard widths).
        num_blocks: blocks per stage (res2..res5); overrides the depth table.
        norm: ``"frozen_bn"`` (official) or ``"gn"`` (trainable GroupNorm, for training from scratch).

    ``forward(x [B, 3, H, W])`` returns ``{name: [B, out_channels[name], H_s, W_s]}`` for ``out_features``
    with ``H_s = ceil(H / stride)`` (each halving rounds up).
    """

    def __init__(
        self,
        depth: int = 50,
        out_features: tuple[str, ...] = ("res3", "res4", "res5"),
        freeze_at: int = 1,
        stem_channels: int = 64,
        base_width: int = 64,
        num_blocks: tuple[int, ...] | None = None,
        norm: str = "frozen_bn",
    ) -> None:
        super().__init__()
        if num_blocks is None:
            if depth not in RESNET_BLOCKS:
                raise ValueError(f"ResNet depth must be one of {sorted(RESNET_BLOCKS)}, got {depth}")
            num_blocks = RESNET_BLOCKS[depth]
        if len(num_blocks) != 4 or any(n < 1 for n in num_blocks):
            raise ValueError(f"num_blocks needs 4 positive counts (res2..res5), got {num_blocks}")
        unknown = [f for f in out_features if f not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"out_features must be a non-empty subset of {STAGE_NAMES}, got {out_features}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if norm not in ("frozen_bn", "gn"):
            raise ValueError(f"unknown ResNet norm {norm!r}; expected 'frozen_bn' or 'gn'")

        self.stem = BasicStem(3, stem_channels, norm)
        num_stages = max(STAGE_NAMES.index(f) for f in out_features) + 1
        channels: dict[str, int] = {}
        in_channels = stem_channels
        self.stage_names: list[str] = []
        for i in range(num_stages):
            name = STAGE_NAMES[i]
            bottleneck = base_width * 2**i
            out_channels = 4 * bottleneck
            stride = 1 if i == 0 else 2  # the stem's max-pool already gives res2 its stride 4
            blocks = []
            for b in range(num_blocks[i]):
                blocks.append(
                    BottleneckBlock(in_channels, bottleneck, out_channels, stride if b == 0 else 1, norm)
                )
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            channels[name] = out_channels
        self._set_outputs(list(out_features), channels, STAGE_STRIDES)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Stop gradients for the stem (``freeze_at >= 1``) and for ``res2..res{freeze_at}``."""
        frozen: list[nn.Module] = []
        if freeze_at >= 1:
            frozen.append(self.stem)
        for i, name in enumerate(self.stage_names):
            if freeze_at >= i + 2:
                frozen.append(getattr(self, name))
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x [B, 3, H, W]`` (normalised image) -> ``{name: [B, C_name, ceil(H/s), ceil(W/s)]}``."""
        if x.dim() != 4:
            raise ValueError(f"ResNet expects a [B, C, H, W] tensor, got shape {tuple(x.shape)}")
        x = self.stem(x)
        outputs: dict[str, Tensor] = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_channels:
                outputs[name] = x
        return outputs


def build_resnet(cfg: ResNetConfig) -> ResNet:
    """ResNet from its config."""
    return ResNet(
        depth=cfg.depth,
        out_features=tuple(cfg.out_features),
        freeze_at=cfg.freeze_at,
        stem_channels=cfg.stem_channels,
        base_width=cfg.base_width,
        num_blocks=tuple(cfg.num_blocks) if cfg.num_blocks is not None else None,
        norm=cfg.norm,
    )
