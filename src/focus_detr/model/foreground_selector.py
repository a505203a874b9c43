"""Foreground Token Selector: token proposals, the score network and top-down score modulation.

Everything here works on flattened multi-scale tokens ``[B, N, C]`` (levels fine to coarse, row-major).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def token_proposals(padding_mask: Tensor, shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """One square box proposal per token, centred on it, sized ``0.05 * 2^level`` of the valid region.

    Args:
        padding_mask: ``[B, N]`` True on padded tokens.
        shapes:       per level ``(H_l, W_l)`` as Python ints.
    Returns:
        proposals: ``[B, N, 4]`` box logits (``log(p / (1 - p))`` of cxcywh, unclamped as the official code),
                   ``+inf`` at padded tokens and tokens whose box is not inside ``(0.01, 0.99)``.
        valid:     ``[B, N]`` True where the proposal is usable (not padding, box inside the margins).
    """
    batch = padding_mask.shape[0]
    device = padding_mask.device
    proposals = []
    start = 0
    for level, (h, w) in enumerate(shapes):
        mask_l = padding_mask[:, start:start + h * w].view(batch, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1)
        valid_w = (~mask_l[:, 0, :]).sum(1)
        # arange equals the official linspace(0, h - 1, h) exactly (integers, step 1.0).
        grid_y, grid_x = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=device),
                                        torch.arange(w, dtype=torch.float32, device=device), indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(batch, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
        proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(~valid[..., None], float("inf"))
    return proposals, valid


class TokenScoreNet(nn.Module):
    """Score network of the foreground token selector (official ``MaskPredictor``).

    ``LN -> Linear -> GELU``, then the second half of the channels is replaced by its mean over the level's
    tokens (a global context vector), then ``Linear -> GELU -> Linear -> GELU -> Linear`` to one logit.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim // 2), nn.GELU(),
            nn.Linear(embed_dim // 2, embed_dim // 4), nn.GELU(),
            nn.Linear(embed_dim // 4, 1),
        )
        self.half = embed_dim // 2

    def forward(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """``tokens [B, n, C]`` of one level -> logits ``[B, n, 1]``.

        ``valid [B, n]``: tokens that count in the global mean (None = all, the official behaviour, which
        averages padding too).
        """
        z = F.gelu(self.proj(self.norm(tokens)))
        z_local, z_global = z.split(self.half, dim=-1)
        if valid is None:
            z_global = z_global.mean(dim=1, keepdim=True)
        else:
            weights = valid.to(z.dtype)[..., None]
            z_global = (z_global * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        z = torch.cat([z_local, z_global.expand(-1, z_local.shape[1], -1)], dim=-1)
        return self.head(z)


class ForegroundTokenSelector(nn.Module):
    """Scores every token, coarse level first; each finer level is modulated by the upsampled score of the
    next coarser one: ``x <- x + x * up(s_{l+1}) * alpha``  (raw logits, learnable ``alpha`` per level)."""

    def __init__(self, embed_dim: int, num_levels: int) -> None:
        super().__init__()
        self.score_net = TokenScoreNet(embed_dim)
        self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-0.3, 0.3))
        self.num_levels = num_levels

    def forward(self, tokens: Tensor, shapes: Sequence[tuple[int, int]], valid: list[Tensor] | None = None,
                level_sizes: Tensor | None = None) -> Tensor:
        """
        Args:
            tokens:      ``[B, N, C]`` projected tokens (padded / invalid tokens already zeroed).
            shapes:      per level ``(H_l, W_l)`` as Python ints.
            valid:       per level ``[B, H_l * W_l]`` tokens that count in the score network's global mean, or
                         None for the official behaviour (the whole padded map is averaged, padding included).
            level_sizes: ``[B, L, 2]`` valid ``(h, w)`` of each image on each level, to upsample each image's own
                         region; None upsamples whole maps (official, or no image is padded).
        Returns:
            ``[B, N]`` raw foreground logits (before any masking).
        """
        batch, _, channels = tokens.shape
        starts = [0]
        for h, w in shapes:
            starts.append(starts[-1] + h * w)
        scores: list[Tensor] = [tokens.new_empty(0)] * self.num_levels
        coarser: Tensor | None = None  # [B, 1, H, W] logits of the previous (coarser) level
        for i, level in enumerate(reversed(range(self.num_levels))):
            h, w = shapes[level]
            x = tokens[:, starts[level]:starts[level + 1]]
            if coarser is not None:
                up = self._upsample(coarser, (h, w), level, level_sizes)
                grid = x.reshape(batch, h, w, channels).permute(0, 3, 1, 2)
                # Same operation order as the official code ((x * up) * alpha) to stay bit-close.
                x = x + (grid * up * self.alpha[i - 1]).permute(0, 2, 3, 1).reshape(batch, -1, channels)
            score = self.score_net(x, None if valid is None else valid[level])
            scores[level] = score
            coarser = score.reshape(batch, 1, h, w)
        return torch.cat(scores, dim=1).squeeze(-1)

    @staticmethod
    def _upsample(coarser: Tensor, size: tuple[int, int], level: int, level_sizes: Tensor | None) -> Tensor:
        if level_sizes is None:
            return F.interpolate(coarser, size, mode="bilinear", align_corners=True)
        # Batch-invariant: upsample each image's valid region to its own valid size, so the result does not
        # depend on how much padding the batch added (align_corners=True scales by the full map size).
        out = coarser.new_zeros(coarser.shape[0], 1, *size)
        for b in range(coarser.shape[0]):
            ch, cw = level_sizes[b, level + 1].tolist()
            fh, fw = level_sizes[b, level].tolist()
            out[b, :, :fh, :fw] = F.interpolate(
                coarser[b:b + 1, :, :ch, :cw], (fh, fw), mode="bilinear", align_corners=True)[0]
        return out
