"""Multi-scale deformable attention module (Deformable DETR / detrex ``MultiScaleDeformableAttention``)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from ..ops.ms_deform_attn import ms_deform_attn


class MultiScaleDeformableAttention(nn.Module):
    """Each query samples ``num_points`` locations per head and level around its reference point.

    Returns only the attention output (``output_proj`` of the sampled values); the caller adds the residual.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Offsets start on a ring of directions (one per head), the k-th point k+1 cells away.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        for i in range(self.num_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query:              ``[B, Q, C]`` (position embedding already added).
            reference_points:   ``[B, Q, L, 2]`` points ``(x, y)`` or ``[B, Q, L, 4]`` boxes ``(cx, cy, w, h)``,
                                normalised to each level's (padded) map.
            value:              ``[B, N, C]`` flattened multi-scale features.
            spatial_shapes:     ``[L, 2]`` ``(H_l, W_l)``.
            value_padding_mask: ``[B, N]`` True where the value is padding (zeroed before sampling).
        Returns:
            ``[B, Q, C]``.
        """
        batch, num_queries, _ = query.shape
        num_values = value.shape[1]
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.num_heads, -1)
        # Mixed precision policy: the projections may run in bfloat16/float16 under autocast, but offsets and
        # attention weights are taken to float32 before they are combined with the float32 reference points
        # and normalised (see sampling_autocast_off).
        offsets = self.sampling_offsets(query).float().view(
            batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).float().view(
            batch, num_queries, self.num_heads, self.num_levels * self.num_points).softmax(-1)
        weights = weights.view(batch, num_queries, self.num_heads, self.num_levels, self.num_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (W_l, H_l).
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
            locations = (reference_points[:, :, None, :, None, :]
                         + offsets / normalizer[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the reference box: at most half its size for offset = num_points.
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        # Bilinear sampling stays in float32 under autocast: half-precision locations lose whole pixels on
        # large maps (one bfloat16 ulp of a coordinate near 0.9 is 1/256 of the map, 0.65 cells at W = 167).
        with sampling_autocast_off(value.device.type):
            output = ms_deform_attn(value.float(), spatial_shapes, locations.float(), weights.float())
        return self.output_proj(output.to(query.dtype))


def sampling_autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Context in which the deformable sampling core runs: autocast off on ``device_type`` if it is on.

    The inputs are cast to float32 at the call site; turning autocast off as well keeps every op inside the
    core (the fast path's ``embedding_bag`` / ``bmm`` / sparse products, the reference's ``grid_sample``) in
    float32 whichever ops a PyTorch version adds to autocast's lower-precision lists. Without autocast no
    context is entered, so traced graphs (ONNX export) are unchanged.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
