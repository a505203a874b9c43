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
        # For every (head, level, point, xy) sample coordinate, the column of a per-query [L * 2] tensor it
        # reads (level l's x or y): reference points and level sizes are widened to the samples' full
        # [heads, L, P, 2] layout with one index_select instead of being broadcast against it (see
        # _sample_locations). Not part of the state dict.
        levels = torch.arange(num_levels).view(1, num_levels, 1, 1)
        xy = torch.arange(2).view(1, 1, 1, 2)
        self.register_buffer("sample_columns", (levels * 2 + xy).expand(num_heads, num_levels, num_points, 2)
                             .reshape(-1).clone(), persistent=False)
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
        locations = self._sample_locations(offsets, reference_points, spatial_shapes)
        # Bilinear sampling stays in float32 under autocast: half-precision locations lose whole pixels on
        # large maps (one bfloat16 ulp of a coordinate near 0.9 is 1/256 of the map, 0.65 cells at W = 167).
        with sampling_autocast_off(value.device.type):
            output = ms_deform_attn(value.float(), spatial_shapes, locations.float(), weights.float())
        return self.output_proj(output.to(query.dtype))

    def _sample_locations(self, offsets: Tensor, reference_points: Tensor, spatial_shapes: Tensor) -> Tensor:
        """``offsets [B, Q, heads, L, P, 2]`` (float32) around ``reference_points [B, Q, L, 2 | 4]`` -> normalised
        sampling locations ``[B, Q, heads, L, P, 2]``.

        The per-query and per-level terms are first widened to the samples' full ``[heads, L, P, 2]`` layout
        (``_widen``). Broadcasting them instead (``ref[:, :, None, :, None, :] + offsets / size[..., None, :]``,
        the official form) leaves PyTorch's CPU kernels an inner loop over the 2 interleaved coordinates:
        4x slower, ~30 ms per dense 800x1333 encoder layer at 2 threads against ~7 ms. Same operations in the
        same order on the same values, so the result is bit-identical to the official form.
        """
        batch, num_queries = offsets.shape[:2]
        if reference_points.shape[-1] == 2:
            # Offsets are in cells of each level: divide by (W_l, H_l).
            size = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            scaled = offsets / size.reshape(1, -1).index_select(1, self.sample_columns).view(offsets.shape[2:])
            return _add(self._widen(reference_points, batch, num_queries), scaled)
        if reference_points.shape[-1] == 4:
            # Offsets are relative to the reference box: at most half its size for offset = num_points.
            box_size = self._widen(reference_points[..., 2:], batch, num_queries)
            scaled = offsets / self.num_points * box_size * 0.5
            return _add(self._widen(reference_points[..., :2], batch, num_queries), scaled)
        raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")

    def _widen(self, per_level: Tensor, batch: int, num_queries: int) -> Tensor:
        """``[B, Q, L, 2]`` -> ``[B, Q, heads, L, P, 2]`` (a new tensor), each sample's level value."""
        rows = per_level.reshape(batch * num_queries, self.num_levels * 2).index_select(1, self.sample_columns)
        return rows.view(batch, num_queries, self.num_heads, self.num_levels, self.num_points, 2)


def _add(widened: Tensor, scaled: Tensor) -> Tensor:
    """``widened + scaled``, in place in ``widened`` (a fresh tensor) when that keeps the promoted dtype."""
    if widened.dtype == torch.promote_types(widened.dtype, scaled.dtype):
        return widened.add_(scaled)
    return widened + scaled


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
