"""Sine position embeddings (DETR / DINO conventions)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    # Channel pairs (2k, 2k+1) share a frequency: temperature^(2*floor(k/2)/num_feats).
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)


class PositionEmbeddingSine(nn.Module):
    """2-D sine embedding of a feature map computed from its padding mask.

    ``forward(mask [B, H, W] bool, True = padding) -> [B, 2 * num_feats, H, W]``, channels ``[y-part, x-part]``,
    each interleaving sin/cos. With ``normalize`` the cumulative coordinates are ``(cumsum + offset) /
    (last cumsum + eps) * scale``, so the embedding spans the valid image region only.
    """

    def __init__(self, num_feats: int, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.num_feats = num_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        self.offset = offset

    def forward(self, mask: Tensor) -> Tensor:
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_feats, self.temperature, mask.device)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        b, h, w = mask.shape
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).view(b, h, w, -1)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).view(b, h, w, -1)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised boxes (DINO decoder query positions).

    ``boxes [B, Q, D]`` (D = 2 or 4, ``(cx, cy, w, h)``) -> ``[B, Q, D * num_feats]`` in the order
    ``[cy, cx, w, h]`` (x and y swapped, as detrex ``get_sine_pos_embed(exchange_xy=True)``).
    """
    dim_t = _frequencies(num_feats, temperature, boxes.device)
    parts = []
    for coord in boxes.split(1, dim=-1):
        x = coord * (2 * math.pi) / dim_t
        parts.append(torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=3).flatten(2))
    parts[0], parts[1] = parts[1], parts[0]
    return torch.cat(parts, dim=2)
