"""Multi-scale deformable attention sampling core (Deformable DETR), pure PyTorch.

The reference implementation samples every level with ``F.grid_sample`` (bilinear, zero padding,
``align_corners=False``), exactly like the official pure-PyTorch fallback that the official code runs on CPU.
Faster implementations register themselves with :func:`register_implementation` and must give the same
result; :func:`ms_deform_attn` picks one (see :func:`select_implementation`).

Implementations and how one is chosen (visible, never silent):

* ``"reference"``: :func:`ms_deform_attn_reference` below.
* ``"fast"``: :func:`~focus_detr.ops.ms_deform_attn_fast.ms_deform_attn_fast`, the gather/``embedding_bag``
  formulation with a hand-written backward; same contract, equal to the reference up to float rounding
  (tested in float64 and with ``gradcheck`` in ``tests/ops/test_ms_deform_attn.py``).
* ``"auto"`` (the default): per call, by the device of ``value``, following :data:`AUTO_RULE`:
  ``"fast"`` on CPU, where ``benchmarks/bench_msda.py`` measured it several times faster than the reference
  at the encoder and decoder shapes, with a fraction of its peak memory (figures: benchmarks/RESULTS.md);
  ``"reference"`` on every other device. One caveat: it runs more (smaller) multi-threaded ops, so on a CPU
  oversubscribed by other processes, where every parallel region waits for a descheduled thread, its
  advantage shrinks (see the benchmark's notes). CUDA stays on the reference
  because no GPU was available to measure when this rule was set: there ``grid_sample`` is one fused
  kernel per level, while the fast path's advantages (channels-last rows, no broadcast multiply over a
  16-wide inner dimension) are CPU-cache arguments. Change the rule only with a measurement
  (``bench_msda.py --device cuda``).

The process-wide choice starts from the environment variable ``FOCUS_DETR_MSDA_IMPL``
(``auto`` | ``reference`` | ``fast``, default ``auto``; anything else is an error at import) and can be
changed with :func:`select_implementation`. :func:`current_implementation` returns the choice and
:func:`implementation_for` the implementation that actually runs for a device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .ms_deform_attn_fast import ms_deform_attn_fast

MSDeformAttnFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Reference multi-scale deformable attention.

    Args:
        value:              ``[B, N, H, D]`` per-head values of all tokens, levels concatenated (fine first).
        spatial_shapes:     ``[L, 2]`` long ``(H_l, W_l)``; ``sum(H_l * W_l) == N``.
        sampling_locations: ``[B, Q, H, L, P, 2]`` ``(x, y)`` in ``[0, 1]`` of each level's map.
        attention_weights:  ``[B, Q, H, L, P]`` weights (softmax over ``L * P`` already applied).
    Returns:
        ``[B, Q, H * D]``.
    """
    batch, _, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # Read once; no int() on the values: under torch.export they are symbolic sizes (traced, not frozen).
    shapes = spatial_shapes.tolist()
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample works on [-1, 1] coordinates.
    grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, (h, w) in enumerate(shapes):
        # [B, H_l*W_l, heads, D] -> [B*heads, D, H_l, W_l]
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * num_heads, head_dim, h, w)
        # [B, Q, heads, P, 2] -> [B*heads, Q, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # -> [B*heads, D, Q, P]
        sampled_per_level.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [B, Q, heads, L, P] -> [B*heads, 1, Q, L*P]
    weights = attention_weights.transpose(1, 2).reshape(batch * num_heads, 1, num_queries, num_levels * num_points)
    # [B*heads, D, Q, L*P] * weights -> [B*heads, D, Q]
    output = (torch.stack(sampled_per_level, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


ENV_VAR = "FOCUS_DETR_MSDA_IMPL"
AUTO = "auto"
# What "auto" runs, by ``value.device.type``; device types not listed use the reference (see module docstring).
AUTO_RULE: dict[str, str] = {"cpu": "fast"}


def implementation_for(device: torch.device | str, implementation: str | None = None) -> str:
    """Name of the implementation :func:`ms_deform_attn` runs for tensors on ``device`` (resolves ``"auto"``)."""
    name = implementation or _DEFAULT
    if name == AUTO:
        return AUTO_RULE.get(torch.device(device).type, "reference")
    return name


def _auto(value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Dispatch by ``value``'s device following :data:`AUTO_RULE`."""
    fn = _IMPLEMENTATIONS[AUTO_RULE.get(value.device.type, "reference")]
    return fn(value, spatial_shapes, sampling_locations, attention_weights)


_IMPLEMENTATIONS: dict[str, MSDeformAttnFn] = {
    "reference": ms_deform_attn_reference,
    "fast": ms_deform_attn_fast,
    AUTO: _auto,
}


def _selection_from_environment(environ: Mapping[str, str] = os.environ) -> str:
    """The initial choice: ``FOCUS_DETR_MSDA_IMPL`` if set (must name a known implementation), else ``"auto"``."""
    name = environ.get(ENV_VAR, "").strip().lower() or AUTO
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"{ENV_VAR}={environ.get(ENV_VAR)!r} is not a deformable attention implementation; "
                         f"choose one of {available_implementations()}")
    return name


def register_implementation(name: str, fn: MSDeformAttnFn, make_default: bool = False) -> None:
    """Make ``fn`` (same signature as :func:`ms_deform_attn_reference`) selectable by ``name``."""
    global _DEFAULT
    _IMPLEMENTATIONS[name] = fn
    if make_default:
        _DEFAULT = name


def available_implementations() -> list[str]:
    return list(_IMPLEMENTATIONS)


def select_implementation(name: str) -> None:
    """Choose the implementation :func:`ms_deform_attn` uses from now on (process-wide; ``"auto"`` restores
    the per-device rule)."""
    global _DEFAULT
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown deformable attention implementation {name!r}; have {available_implementations()}")
    _DEFAULT = name


def current_implementation() -> str:
    """The current process-wide choice (possibly ``"auto"``; see :func:`implementation_for`)."""
    return _DEFAULT


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    implementation: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention with the selected implementation (shapes as the reference)."""
    fn = _IMPLEMENTATIONS[implementation or _DEFAULT]
    return fn(value, spatial_shapes, sampling_locations, attention_weights)


_DEFAULT = _selection_from_environment()
