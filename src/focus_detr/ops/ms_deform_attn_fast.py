"""Gather-based multi-scale deformable attention: same contract and numerics as the reference, faster on CPU.

Why the reference (:func:`~focus_detr.ops.ms_deform_attn.ms_deform_attn_reference`) is slow on CPU: it samples
each level with ``F.grid_sample`` on a channels-first map (the ``D`` channels of one corner lie ``H_l * W_l``
elements apart), then reduces a ``[B*heads, D, Q, L*P]`` tensor with a broadcast multiply whose innermost
dimension is only ``L*P = 16`` long; that multiply and the ``stack`` feeding it cost more than the sampling,
and autograd keeps the stacked tensor alive for the backward pass.

What this implementation does instead (plain PyTorch ops only, CPU and CUDA):

* All levels live in one zero-padded, channels-last table ``[B * N_pad * heads, D]`` (:func:`_padded_table`).
  Every sample needs the 4 rows around its top-left corner; the row arithmetic is done once per call.
* Forward: one ``F.embedding_bag(mode="sum", per_sample_weights=...)`` bag of ``4 * L * P`` corner rows per
  ``(query, head)``, weighted by bilinear weight x attention weight. ``embedding_bag`` fuses the gather with
  the weighted sum, so no ``[Q*heads, 4*L*P, D]`` intermediate is ever written.
* Backward (:class:`_MSDeformAttnFast`, closed form, no autograd graph through the gathers):

  - value: the transposed problem. Samples are sorted by top-left row, and 4 ``embedding_bag`` calls (one
    per corner) sum ``weight * grad_out`` over the samples of each top-left row; :func:`_fold_corner_grads`
    then shifts the 4 results onto the cells (faster than ``scatter_add_`` / ``index_add_`` / ``index_put_``
    of materialised 4-corner rows); sorting the ``B*Q*heads*L*P`` int32 keys is cheap.
  - locations and attention weights: per-corner dot products ``<grad_out, value[corner]>``, combined in
    closed form. The dots are one sampled dense-dense matmul (``torch.sparse.sampled_addmm`` on a CSR pattern
    with ``4 * L * P`` entries per ``(query, head)``); where that op is unavailable, corner rows are gathered
    in cache-sized chunks (``embedding_bag`` with bags of one row, faster than ``index_select`` for short
    rows) and reduced with a ``bmm``.
* Queries are processed in spatial order (:func:`_spatial_order`) so that neighbouring bags read neighbouring
  rows; outputs and gradients are returned in the caller's order.
* Per-sample arithmetic runs on "planar" ``[n, heads, 2 | 4, L*P]`` tensors with per-level constants
  repeated to full ``L*P`` width: broadcasting a ``[L, 1, 2]`` constant against interleaved ``(x, y)`` pairs
  leaves PyTorch's CPU kernels an inner loop of length 2, many times slower per element.

Numerics (``align_corners=False``, zero padding, as ``grid_sample``): location ``x`` maps to pixel
coordinate ``x * W - 0.5`` (pixel ``i`` is centred at ``(i + 0.5) / W``), the formula of the official CUDA
kernel; ``grid_sample`` computes the same number as ``((2x - 1 + 1) * W - 1) / 2``. Each level's map has one
row/column of zeros on every side, so a corner just outside the map reads a zero instead of needing a mask.
Pixel coordinates are clamped to ``[-1, W]`` first: beyond that all four corners are outside the map, the
output is exactly zero and ``grid_sample``'s location gradient is zero, which the backward reproduces with a
mask (see :func:`_sample_geometry`). Non-finite locations give NaN for their (query, head), as in the
reference. In float64 the results agree with the reference to ~1e-15. In float32 the two round the pixel
coordinate differently (one ulp of a coordinate near 167 is 1.5e-5), so outputs differ by up to ~1e-5 at the
800x1333 shapes with unit-variance values; at the rare points whose coordinate rounds to different sides of
an integer (a kink of the bilinear weights) the two location gradients are the two one-sided derivatives.

Memory: the padded table (~1x ``value``), per-sample geometry saved for the backward (20 bytes per sample
point in float32 with int32 rows, ~57 MB for the dense 800x1333 encoder), chunk temporaries (see
``FORWARD_CHUNK_SAMPLES``), and in the backward four ``[B * N_pad * heads, D]`` corner gradients plus sort
buffers; a fraction of the reference's peak (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

# Chunk sizes, in sample points (one sample = one (query, head, level, point)). Per-sample work is chunked
# only to bound temporaries (~50 bytes per sample point); single-threaded time does not depend on the chunk
# size over a wide range, but every op in the chunk loop is a parallel region that must wake the other
# threads, which is expensive on a busy machine, so chunks are large: the dense 800x1333 encoder (2.8M
# sample points) runs as one chunk, ~190 MB of temporaries in the forward pass.
# ``BACKWARD_CHUNK_SAMPLES`` bounds the gathered corner rows of the fallback dot-product path (4 * D * 4 bytes
# per sample point, 8 MB at 2**14, kept cache-resident until the ``bmm`` reads them).
FORWARD_CHUNK_SAMPLES = 2**22
BACKWARD_CHUNK_SAMPLES = 2**14

# Per-corner dot products in the backward: one sparse SDDMM call (``torch.sparse.sampled_addmm``, one
# parallel region) where the build and device support it, else the gather path (see
# _location_and_weight_grads); set to False after the first failure of the sparse op.
_sddmm_supported = True

# Table rows are computed in floating point (exact below 2**24 in float32, else float64 is used) and
# stored as int32 when they fit: int32 halves index memory and speeds up the backward's sort.
_FLOAT32_EXACT = 2**24
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class _Layout:
    """Where each level lives in the zero-padded value table (plain ints derived from ``spatial_shapes``).

    The table is ``[B, N_pad, heads, D]`` (row ``(b * N_pad + n) * heads + h``): level ``l`` is an
    ``(H_l + 2) x (W_l + 2)`` map (one zero row/column on every side) starting at token ``padded_starts[l]``.
    Keeping ``value``'s ``(token, head)`` order makes building the table and folding its gradient plain
    block copies.
    """

    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]
    padded_starts: tuple[int, ...]
    padded_tokens: int

    @staticmethod
    def from_spatial_shapes(spatial_shapes: Tensor) -> _Layout:
        shapes = tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
        starts, padded_starts = [], []
        start = padded = 0
        for h, w in shapes:
            starts.append(start)
            padded_starts.append(padded)
            start += h * w
            padded += (h + 2) * (w + 2)
        return _Layout(shapes, tuple(starts), tuple(padded_starts), padded)


def _padded_table(value: Tensor, layout: _Layout) -> Tensor:
    """``value [B, N, H, D]`` -> zero-padded table ``[B * N_pad * H, D]``."""
    batch, _, num_heads, head_dim = value.shape
    table = value.new_zeros(batch, layout.padded_tokens, num_heads, head_dim)
    for (h, w), start, pstart in zip(layout.shapes, layout.starts, layout.padded_starts):
        padded_map = table[:, pstart : pstart + (h + 2) * (w + 2)].unflatten(1, (h + 2, w + 2))
        padded_map[:, 1:-1, 1:-1] = value[:, start : start + h * w].unflatten(1, (h, w))
    return table.view(-1, head_dim)


def _fold_corner_grads(corner_grads: list[Tensor], layout: _Layout, batch: int, num_tokens: int) -> Tensor:
    """Per-corner gradients at top-left rows -> value gradient ``[B, N, H, D]``.

    ``corner_grads[c]`` (``[B * N_pad * H, D]``, c = 2 * dy + dx) holds, at each top-left padded cell
    ``(y, x)``, the gradient flowing to its corner ``(y + dy, x + dx)``; each cell collects it from the 4
    top-left cells it is a corner of. Gradient reaching the zero border is dropped (not part of ``value``).
    """
    head_dim = corner_grads[0].shape[-1]
    grads = [g.view(batch, layout.padded_tokens, -1, head_dim) for g in corner_grads]
    num_heads = grads[0].shape[2]
    grad_value = grads[0].new_empty(batch, num_tokens, num_heads, head_dim)
    for (h, w), start, pstart in zip(layout.shapes, layout.starts, layout.padded_starts):
        g00, g01, g10, g11 = (g[:, pstart : pstart + (h + 2) * (w + 2)].unflatten(1, (h + 2, w + 2)) for g in grads)
        cell = grad_value[:, start : start + h * w].unflatten(1, (h, w))  # [B, h, w, heads, D] view
        # Interior cell (y, x) (padded coords 1..h, 1..w) is corner (dy, dx) of top-left (y - dy, x - dx).
        torch.add(g00[:, 1:-1, 1:-1], g01[:, 1:-1, :-2], out=cell)
        cell += g10[:, :-2, 1:-1]
        cell += g11[:, :-2, :-2]
    return grad_value


class _Constants:
    """Per-call constants, repeated to full ``L*P`` width so that every elementwise op over a chunk's
    ``[n, heads, 2 | 4, L*P]`` tensors runs with contiguous inner loops (see the module docstring)."""

    def __init__(
        self, layout: _Layout, batch: int, num_heads: int, num_points: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        def per_sample(values: list[list[float]], kind: torch.dtype) -> Tensor:
            # [rows, L] -> [rows, L * P]: repeat each level's constant for its P points.
            return torch.tensor(values, dtype=kind, device=device).repeat_interleave(num_points, dim=-1)

        widths = [w for _, w in layout.shapes]
        heights = [h for h, _ in layout.shapes]
        padded_w = [w + 2 for w in widths]
        block_rows = layout.padded_tokens * num_heads
        self.num_heads = num_heads
        self.block_rows = block_rows
        self.table_rows = batch * block_rows
        self.row_dtype = torch.int32 if self.table_rows <= _INT32_MAX else torch.long
        arithmetic = dtype if dtype == torch.float64 or block_rows < _FLOAT32_EXACT else torch.float64
        # [2, L*P]: (x, y) location -> pixel coordinate factor (W_l, H_l), also the upper clamp bound.
        self.scale = per_sample([widths, heights], dtype)
        self.high_floor = self.scale - 1  # top-left x0 <= W_l - 1 keeps x0 + 1 inside the padded map
        self.minus_half = torch.tensor(-0.5, dtype=dtype, device=device)
        self.minus_one = torch.tensor(-1.0, dtype=dtype, device=device)
        # Top-left corner (x0, y0) (each >= -1) of level l is padded token start_l + (y0 + 1) * Wp + (x0 + 1);
        # its row in batch 0, head 0 is that token * heads = level_base_l + y0 * row_stride_l + x0 * heads.
        self.arithmetic = arithmetic
        self.row_stride = per_sample([[wp * num_heads for wp in padded_w]], arithmetic)[0]
        self.level_base = per_sample(
            [[(s + wp + 1) * num_heads for s, wp in zip(layout.padded_starts, padded_w)]], arithmetic
        )[0]
        # [4, L*P] row offsets of the corners (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1) from the top-left.
        self.corner_offsets = per_sample(
            [[0] * len(padded_w), [num_heads] * len(padded_w), [wp * num_heads for wp in padded_w],
             [(wp + 1) * num_heads for wp in padded_w]],
            self.row_dtype,
        )

    def row_offsets(self, q_start: int, q_end: int, num_queries: int, device: torch.device) -> Tensor:
        """``[n, heads, 1]``: row offset ``b * N_pad * heads + h`` of flattened queries ``q_start:q_end``."""
        batch_index = torch.arange(q_start, q_end, device=device) // num_queries
        heads = torch.arange(self.num_heads, device=device)
        return (batch_index[:, None] * self.block_rows + heads).unsqueeze(-1).to(self.row_dtype)


def _sample_geometry(
    locations: Tensor,
    row_offsets: Tensor,
    consts: _Constants,
    frac_out: Tensor,
    top_left_out: Tensor,
    grad_scale_out: Tensor | None,
) -> None:
    """Top-left table row, bilinear fractions and location-gradient scale of every sample of one chunk.

    Args:
        locations:      ``[n, heads, 2, L*P]`` (a planar view of the ``(x, y)`` pairs).
        row_offsets:    ``[n, heads, 1]`` from :meth:`_Constants.row_offsets`.
        frac_out:       ``[n, heads, 2, L*P]`` receives ``(fx, fy)`` in ``[0, 1]``.
        top_left_out:   ``[n, heads, L*P]`` receives the table row of each sample's top-left corner.
        grad_scale_out: ``[n, heads, 2, L*P]`` (optional) receives ``(W_l, H_l)`` where ``grid_sample``'s
                        location gradient flows and ``0`` where the point is beyond the zero border
                        (pixel coordinate ``< -1`` or ``>= W``: all four corners outside).
    """
    pixel = torch.addcmul(consts.minus_half, locations, consts.scale, out=frac_out)  # loc * W - 0.5, in frac's buffer
    if grad_scale_out is not None:
        inside = pixel >= -1
        inside &= pixel < consts.scale
        torch.mul(inside, consts.scale, out=grad_scale_out)
    # Non-finite locations: the reference returns NaN for that (query, head); keep a NaN "poison" to add
    # to the fractions, and give the index arithmetic a finite stand-in so every row stays in range.
    poison = pixel - pixel  # 0, or NaN where the location is NaN or +-inf
    pixel.nan_to_num_(nan=-1.0)
    pixel.clamp_(consts.minus_one, consts.scale)
    top_left_xy = pixel.floor()
    torch.minimum(top_left_xy, consts.high_floor, out=top_left_xy)
    pixel.sub_(top_left_xy)  # frac = pixel - x0, in [0, 1] (equals 1 only at the clamped far border)
    pixel.add_(poison)
    top_left_xy = top_left_xy.to(consts.arithmetic)
    row = torch.addcmul(consts.level_base, top_left_xy[:, :, 1], consts.row_stride)
    row.add_(top_left_xy[:, :, 0], alpha=consts.num_heads)
    torch.add(row.to(consts.row_dtype), row_offsets, out=top_left_out)


def _corner_weights(frac: Tensor, attention_weights: Tensor, out: Tensor) -> Tensor:
    """Bilinear weight x attention weight of each corner.

    Args:
        frac:              ``[..., 2, L*P]`` fractional parts ``(fx, fy)``.
        attention_weights: ``[..., L*P]``.
        out:               ``[..., 4, L*P]`` receives corners ``(y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1)``.
    """
    fx, fy = frac.select(-2, 0), frac.select(-2, 1)
    right = attention_weights * fx  # a * fx
    left = attention_weights - right  # a * (1 - fx)
    top = 1 - fy
    if torch.compiler.is_compiling():
        # Dynamo breaks the graph on `out=` into a non-contiguous view; copies into the views trace (same values).
        for corner, (horizontal, vertical) in enumerate(((left, top), (right, top), (left, fy), (right, fy))):
            out.select(-2, corner).copy_(horizontal * vertical)
        return out
    torch.mul(left, top, out=out.select(-2, 0))
    torch.mul(right, top, out=out.select(-2, 1))
    torch.mul(left, fy, out=out.select(-2, 2))
    torch.mul(right, fy, out=out.select(-2, 3))
    return out


def _queries_per_chunk(budget_samples: int, num_heads: int, num_samples: int) -> int:
    return max(1, budget_samples // (num_heads * num_samples))


def _value_grad(
    grad_rows: Tensor,
    weights: Tensor,
    frac_all: Tensor,
    top_left_all: Tensor,
    consts: _Constants,
    layout: _Layout,
    batch: int,
    num_tokens: int,
) -> Tensor:
    """Value gradient: for each corner, sum ``weight * grad_out`` over the samples sharing a top-left row.

    Args:
        grad_rows:    ``[B*Q*heads, D]`` output gradient, one row per (query, head).
        weights:      ``[B*Q, heads, L*P]`` attention weights.
        frac_all:     ``[B*Q, heads, 2, L*P]``; ``top_left_all``: ``[B*Q, heads, L*P]`` (saved geometry).
    Returns:
        ``[B, N, heads, D]``.
    """
    num_samples = top_left_all.shape[-1]
    keys = top_left_all.reshape(-1)
    # Bags = top-left rows (all of them, most empty), members = samples sorted by top-left row. A stable
    # sort keeps each bag's summation order fixed, so gradients are bitwise reproducible; searchsorted
    # (rather than bincount) keeps this deterministic on CUDA too.
    sorted_keys, order = torch.sort(keys, stable=True)
    all_rows = torch.arange(consts.table_rows, dtype=sorted_keys.dtype, device=sorted_keys.device)
    offsets = torch.searchsorted(sorted_keys, all_rows)
    # sample (q, h, l, p) -> its output row (q, h); a shift when L*P is a power of two (cheaper than //)
    shift = num_samples.bit_length() - 1
    members = order >> shift if num_samples == 1 << shift else order // num_samples
    # [4, B*Q, heads, L*P]: weight of each corner, corner-major so that each corner's weights are contiguous.
    corner_w = _corner_weights(frac_all, weights, weights.new_empty(4, *weights.shape).movedim(0, -2))
    corner_w = corner_w.movedim(-2, 0)
    corner_grads = [
        F.embedding_bag(
            members, grad_rows, offsets, mode="sum", per_sample_weights=corner_w[c].reshape(-1).index_select(0, order)
        )
        for c in range(4)
    ]
    return _fold_corner_grads(corner_grads, layout, batch, num_tokens)


def _corner_dots_sddmm(grad_rows: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``dots[r, k] = <grad_rows[r], table[rows[r, k]]>`` as one sampled dense-dense matmul (SDDMM).

    Args:
        grad_rows: ``[R, D]``; ``table``: ``[T, D]``; ``rows``: ``[R, K]`` row indices (int32 or int64).
    Returns:
        ``[R, K]``.
    """
    num_rows, per_row = rows.shape
    crow = torch.arange(0, num_rows * per_row + 1, per_row, dtype=rows.dtype, device=rows.device)
    zeros = grad_rows.new_zeros(num_rows * per_row)
    with warnings.catch_warnings():
        # PyTorch warns (once) that sparse CSR support is beta; the one op used here is checked against the
        # reference by the tests, and the gather path takes over if it is missing.
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(crow, rows.reshape(-1), zeros, size=(num_rows, table.shape[0]),
                                          check_invariants=False)
        # In place (out=pattern): each value only depends on itself (times beta = 0; zeros, never NaN), and
        # it skips the copy of the index arrays that a fresh result costs (half the time of the call).
        torch.sparse.sampled_addmm(pattern, grad_rows, table.t(), beta=0.0, out=pattern)
    return pattern.values().view(num_rows, per_row)


def _corner_dots_gather(grad_rows: Tensor, table: Tensor, rows: Tensor, chunk_rows: int) -> Tensor:
    """Same as :func:`_corner_dots_sddmm` with gathered rows (``embedding_bag`` with bags of one row, faster
    than ``index_select`` for short rows) and a ``bmm``, in chunks of ``chunk_rows`` rows of ``rows``."""
    num_rows, per_row = rows.shape
    head_dim = table.shape[1]
    dots = grad_rows.new_empty(num_rows, 1, per_row)
    single = torch.arange(min(chunk_rows, num_rows) * per_row, dtype=rows.dtype, device=rows.device)
    for r0 in range(0, num_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, num_rows)
        block = F.embedding_bag(rows[r0:r1].reshape(-1), table, single[: (r1 - r0) * per_row], mode="sum")
        # [n, 1, D] @ [n, D, K] -> [n, 1, K]
        torch.bmm(grad_rows[r0:r1].unsqueeze(1), block.view(r1 - r0, per_row, head_dim).transpose(1, 2),
                  out=dots[r0:r1])
    return dots.view(num_rows, per_row)


def _location_and_weight_grads(
    grad_rows: Tensor,
    table: Tensor,
    weights: Tensor,
    frac_all: Tensor,
    top_left_all: Tensor,
    grad_scale_all: Tensor | None,
    consts: _Constants,
    need_loc: bool,
    need_weights: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """Closed-form gradients of the sampling locations and attention weights.

    With ``d_c = <grad_out, value[corner c]>`` and ``out = a * sum_c bilinear_c * value[c]``:
    ``d a = sum_c bilinear_c * d_c`` and ``d frac_x = a * ((1 - fy)(d01 - d00) + fy (d11 - d10))`` (same for
    y), and ``frac_x = loc_x * W - 0.5 - x0`` gives ``d loc_x = W * d frac_x`` inside the border, 0 beyond it.

    Args: as :func:`_value_grad`, plus ``table [B*N_pad*heads, D]`` and ``grad_scale_all [B*Q, heads, 2, L*P]``.
    Returns:
        ``grad_loc [B*Q, heads, L*P, 2]`` and ``grad_weights [B*Q, heads, L*P]`` (``None`` if not needed).
    """
    global _sddmm_supported
    total, num_heads, num_samples = top_left_all.shape
    corners = 4 * num_samples
    grad_loc = table.new_empty(total, num_heads, num_samples, 2) if need_loc else None
    grad_weights = table.new_empty(total, num_heads, num_samples) if need_weights else None
    chunk = _queries_per_chunk(FORWARD_CHUNK_SAMPLES, num_heads, num_samples)
    for q0 in range(0, total, chunk):
        q1 = min(q0 + chunk, total)
        n = q1 - q0
        rows = (top_left_all[q0:q1].unsqueeze(2) + consts.corner_offsets).view(n * num_heads, corners)
        grad_chunk = grad_rows[q0 * num_heads : q1 * num_heads]
        dots = None
        if _sddmm_supported:
            try:
                dots = _corner_dots_sddmm(grad_chunk, table, rows)
            except (RuntimeError, NotImplementedError):  # a build or device without sparse CSR SDDMM
                _sddmm_supported = False
        if dots is None:
            gather_rows = max(1, BACKWARD_CHUNK_SAMPLES // num_samples)
            dots = _corner_dots_gather(grad_chunk, table, rows, gather_rows)
        d00, d01, d10, d11 = dots.view(n, num_heads, 4, num_samples).unbind(2)
        frac = frac_all[q0:q1]
        fx, fy = frac[:, :, 0], frac[:, :, 1]
        # out = a * [(1 - fy) * top + fy * bottom] with top/bottom interpolated along x.
        top = torch.lerp(d00, d01, fx)
        bottom = torch.lerp(d10, d11, fx)
        if grad_weights is not None:
            torch.lerp(top, bottom, fy, out=grad_weights[q0:q1])
        if grad_loc is not None:
            assert grad_scale_all is not None
            d_fx = torch.lerp(d01 - d00, d11 - d10, fy)
            d_fy = bottom.sub_(top)
            scale = grad_scale_all[q0:q1] * weights[q0:q1].unsqueeze(2)  # [n, heads, 2, L*P]
            planar = grad_loc[q0:q1].transpose(-1, -2)  # [n, heads, 2, L*P] view of the (x, y) pairs
            torch.mul(d_fx, scale[:, :, 0], out=planar[:, :, 0])
            torch.mul(d_fy, scale[:, :, 1], out=planar[:, :, 1])
    return grad_loc, grad_weights


def _spatial_order(locations: Tensor, num_queries: int, layout: _Layout) -> Tensor:
    """``[B*Q]`` permutation that visits the queries batch by batch, in raster order of the finest-level cell of
    their first sampling point (head 0, point 0).

    Neighbouring queries then read neighbouring table rows, which keeps the gathers cache-friendly when the
    caller's order is spatially random (the focus encoder's score-sorted tokens). ``locations``: ``[B*Q,
    heads, 2, L*P]`` planar view. Batches stay in order, so position ``i`` of the permutation is still batch
    ``i // Q``.
    """
    height, width = layout.shapes[0]
    first = locations[:, 0, :, 0].to(torch.float64)  # [B*Q, 2]: (x, y) of head 0, level 0, point 0
    cell_x = (first[:, 0] * width).floor_().clamp_(0, width - 1)
    cell_y = (first[:, 1] * height).floor_().clamp_(0, height - 1)
    batch_index = torch.arange(locations.shape[0], device=locations.device) // num_queries
    key = (batch_index * height + cell_y) * width + cell_x
    return torch.argsort(key.nan_to_num_(0.0), stable=True)


class _MSDeformAttnFast(torch.autograd.Function):
    """Forward: one weighted ``embedding_bag`` over the corner rows. Backward: closed form (see module doc)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        value: Tensor,
        spatial_shapes: Tensor,
        sampling_locations: Tensor,
        attention_weights: Tensor,
    ) -> Tensor:
        batch, num_tokens, num_heads, head_dim = value.shape
        _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
        num_samples = num_levels * num_points
        corners = 4 * num_samples
        total = batch * num_queries
        device = value.device
        layout = _Layout.from_spatial_shapes(spatial_shapes)
        consts = _Constants(layout, batch, num_heads, num_points, value.dtype, device)
        table = _padded_table(value, layout)

        # Planar views: [B*Q, heads, 2, L*P] locations, [B*Q, heads, L*P] weights.
        locations = sampling_locations.reshape(total, num_heads, num_samples, 2).transpose(-1, -2)
        weights = attention_weights.reshape(total, num_heads, num_samples)
        # Work in spatial order (see _spatial_order); the output is put back in the caller's order at the end.
        order = _spatial_order(locations, num_queries, layout) if total > 1 else None
        if order is not None:
            locations = locations.index_select(0, order)
            weights = weights.index_select(0, order)
        need_backward = any(ctx.needs_input_grad)
        need_loc_grad = ctx.needs_input_grad[2]
        chunk = _queries_per_chunk(FORWARD_CHUNK_SAMPLES, num_heads, num_samples)

        # Per-sample geometry: kept whole for the backward pass (so it does not redo the index arithmetic),
        # else chunk-sized scratch.
        kept = total if need_backward else min(chunk, total)
        frac_all = value.new_empty(kept, num_heads, 2, num_samples)
        top_left_all = torch.empty(kept, num_heads, num_samples, dtype=consts.row_dtype, device=device)
        grad_scale_all = value.new_empty(total, num_heads, 2, num_samples) if need_loc_grad else None

        output = value.new_empty(total * num_heads, head_dim)
        corner_w = value.new_empty(min(chunk, total), num_heads, 4, num_samples)
        for q0 in range(0, total, chunk):
            q1 = min(q0 + chunk, total)
            n = q1 - q0
            k0 = q0 if need_backward else 0
            frac, top_left = frac_all[k0 : k0 + n], top_left_all[k0 : k0 + n]
            _sample_geometry(
                locations[q0:q1],
                consts.row_offsets(q0, q1, num_queries, device),
                consts,
                frac,
                top_left,
                None if grad_scale_all is None else grad_scale_all[q0:q1],
            )
            # [n, heads, 4, L*P] rows of every corner; corner-major so that weights are written planar too.
            rows = top_left.unsqueeze(2) + consts.corner_offsets
            w = _corner_weights(frac, weights[q0:q1], corner_w[:n])
            # One bag of 4*L*P weighted corner rows per (query, head).
            output[q0 * num_heads : q1 * num_heads] = F.embedding_bag(
                rows.view(n * num_heads, corners), table, mode="sum", per_sample_weights=w.view(n * num_heads, corners)
            )

        if order is not None:
            output = output.view(total, num_heads * head_dim)
            output = torch.empty_like(output).index_copy_(0, order, output)
        ctx.layout = layout
        ctx.consts = consts
        ctx.dims = (batch, num_tokens, num_heads, head_dim, num_queries, num_levels, num_points)
        if need_backward:
            ctx.save_for_backward(table, weights, frac_all, top_left_all, grad_scale_all, order)
        return output.view(batch, num_queries, num_heads * head_dim)

    @staticmethod
    @once_differentiable  # the closed-form backward is not itself differentiable: fail loudly on double backward
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        # Everything saved is in the forward's working (spatial) order; `order` maps it to the caller's.
        table, weights, frac_all, top_left_all, grad_scale_all, order = ctx.saved_tensors
        layout: _Layout = ctx.layout
        consts: _Constants = ctx.consts
        batch, num_tokens, num_heads, head_dim, num_queries, num_levels, num_points = ctx.dims
        need_value, _, need_loc, need_weights = ctx.needs_input_grad[:4]
        total = batch * num_queries

        grad_rows = grad_output.reshape(total, num_heads * head_dim)
        grad_rows = grad_rows.contiguous() if order is None else grad_rows.index_select(0, order)
        grad_rows = grad_rows.view(total * num_heads, head_dim)
        grad_value = grad_loc = grad_weights = None
        if need_value:
            grad_value = _value_grad(grad_rows, weights, frac_all, top_left_all, consts, layout, batch, num_tokens)
        if need_loc or need_weights:
            grad_loc, grad_weights = _location_and_weight_grads(
                grad_rows, table, weights, frac_all, top_left_all, grad_scale_all, consts, need_loc, need_weights
            )
            if order is not None:  # back to the caller's query order
                grad_loc = None if grad_loc is None else torch.empty_like(grad_loc).index_copy_(0, order, grad_loc)
                grad_weights = (None if grad_weights is None
                                else torch.empty_like(grad_weights).index_copy_(0, order, grad_weights))
            if grad_loc is not None:
                grad_loc = grad_loc.view(batch, num_queries, num_heads, num_levels, num_points, 2)
            if grad_weights is not None:
                grad_weights = grad_weights.view(batch, num_queries, num_heads, num_levels, num_points)
        return grad_value, None, grad_loc, grad_weights


def ms_deform_attn_fast(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Gather-based multi-scale deformable attention (same contract as ``ms_deform_attn_reference``).

    Args:
        value:              ``[B, N, H, D]`` per-head values of all tokens, levels concatenated (fine first).
        spatial_shapes:     ``[L, 2]`` long ``(H_l, W_l)``; ``sum(H_l * W_l) == N``.
        sampling_locations: ``[B, Q, H, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` of each level's map.
        attention_weights:  ``[B, Q, H, L, P]`` weights (softmax over ``L * P`` already applied).
    Returns:
        ``[B, Q, H * D]`` in ``value``'s dtype. Half-precision inputs are computed in float32: the
        fractional pixel position needs more than the 8-11 mantissa bits of bf16/fp16 on a 100+ pixel map.
    """
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    dtype = torch.promote_types(dtype, attention_weights.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    output = _MSDeformAttnFast.apply(
        value.to(dtype), spatial_shapes, sampling_locations.to(dtype), attention_weights.to(dtype)
    )
    return output.to(value.dtype)
