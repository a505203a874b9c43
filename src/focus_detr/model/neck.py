"""ChannelMapper neck: project backbone levels to ``embed_dim`` and add one extra stride-2 level."""

from __future__ import annotations

from torch import Tensor, nn


class ConvNorm(nn.Module):
    """Conv2d (with bias) followed by GroupNorm, no activation (detrex ``ConvNormAct`` as the neck uses it)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2)
        self.norm = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class ChannelMapper(nn.Module):
    """``convs[i]``: 1x1 conv + GN per backbone level; ``extra_convs[0]``: 3x3 stride-2 conv + GN applied to
    the raw last backbone feature (not to its projection), giving the 4th, stride-64 level.

    ``forward(features: list of [B, C_i, H_i, W_i]) -> list of [B, embed_dim, H, W]`` (fine to coarse).
    """

    def __init__(self, in_channels: list[int], embed_dim: int, num_extra_levels: int = 1, num_groups: int = 32) -> None:
        super().__init__()
        groups = min(num_groups, embed_dim)
        self.convs = nn.ModuleList(ConvNorm(c, embed_dim, 1, 1, groups) for c in in_channels)
        self.extra_convs = nn.ModuleList(
            ConvNorm(in_channels[-1] if i == 0 else embed_dim, embed_dim, 3, 2, groups) for i in range(num_extra_levels)
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight, gain=1)
                nn.init.zeros_(module.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        outs = [conv(f) for conv, f in zip(self.convs, features)]
        x = features[-1]
        for conv in self.extra_convs:
            x = conv(x)
            outs.append(x)
        return outs
