"""FLOP counting: ``torch.utils.flop_counter.FlopCounterMode`` plus an explicit count of deformable sampling.

Convention: **2 FLOP per multiply-add (MAC)**, as ``FlopCounterMode`` counts matrix products and convolutions.
fvcore-style tables (the paper's GFLOPs) count 1 MAC as 1 "FLOP": divide our numbers by 2 to compare.

What the counter sees and what we add:

* convolutions, ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` (every ``nn.Linear``) -- counted by the counter;
* attention kernels the counter does not know on CPU (``_scaled_dot_product_flash_attention_for_cpu``, the
  fused ``_native_multi_head_attention`` fast path of ``nn.MultiheadAttention`` in inference) -- counted by the
  formulas in :data:`EXTRA_FLOP_FORMULAS` (same MAC arithmetic as the counter's own attention formulas);
* multi-scale deformable attention sampling (``grid_sample`` and the attention-weighted sum in the reference
  core, or any fast path) -- invisible to the counter, counted analytically by :func:`deformable_sampling_flops`
  from the module geometry (a forward pre-hook on each deformable-attention module);
* element-wise work (LayerNorm, softmax, activations, additions, gathers/scatters, top-k) -- counted by nobody,
  as in fvcore and in the official model's count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..model.stages import observe_stages

# Multiply-adds per sampling point and channel: bilinear interpolation reads 4 corners and multiply-adds each
# with its corner weight (4 MAC), then the sampled value is multiplied by its attention weight and
# accumulated over the L*P points of the head (1 MAC).
SAMPLING_MACS_PER_POINT_CHANNEL = 5


def deformable_sampling_flops(batch: int, num_queries: int, num_heads: int, num_levels: int, num_points: int,
                              head_dim: int) -> int:
    """FLOPs of the sampling core of multi-scale deformable attention (not the linear layers around it).

    ``FLOPs = 2 * 5 * B * Q * H * L * P * D``: per query, head, level and point, bilinear sampling costs 4 corner
    reads x one multiply-add per channel (4 MAC per channel) and the attention-weighted sum 1 MAC per channel;
    2 FLOP per MAC. The per-point corner weights and indices (~10 scalar ops per point, independent of ``D``)
    are ignored, like the element-wise work elsewhere.

    Example: B=1, Q=2, H=2, L=1, P=3, D=4 -> 2 * 5 * 1*2*2*1*3*4 = 480.
    """
    return 2 * SAMPLING_MACS_PER_POINT_CHANNEL * batch * num_queries * num_heads * num_levels * num_points * head_dim


def _msda_geometry(module: nn.Module) -> tuple[int, int, int, int] | None:
    """``(heads, levels, points, head_dim)`` of a deformable attention module (ours or transformers'), else None."""
    from ..layers.deformable_attention import MultiScaleDeformableAttention

    if isinstance(module, MultiScaleDeformableAttention):
        return module.num_heads, module.num_levels, module.num_points, module.embed_dim // module.num_heads
    # transformers' DeformableDetrMultiscaleDeformableAttention (and its copies in other models)
    if type(module).__name__.endswith("MultiscaleDeformableAttention") and all(
            hasattr(module, a) for a in ("n_heads", "n_levels", "n_points", "d_model")):
        return module.n_heads, module.n_levels, module.n_points, module.d_model // module.n_heads
    return None


class SamplingCounter:
    """Context manager adding :func:`deformable_sampling_flops` for every deformable-attention call in ``model``.

    ``flops`` is the running total; ``elements`` the number of sampled values ``B*Q*H*L*P*D`` (what
    ``grid_sample`` outputs in the reference core).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flops = 0
        self.elements = 0
        self.calls = 0
        self._handles: list[Any] = []

    def _hook(self, geometry: tuple[int, int, int, int]) -> Callable[..., None]:
        heads, levels, points, head_dim = geometry

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            query = args[0] if args else kwargs.get("query", kwargs.get("hidden_states"))
            batch, num_queries = int(query.shape[0]), int(query.shape[1])
            self.flops += deformable_sampling_flops(batch, num_queries, heads, levels, points, head_dim)
            self.elements += batch * num_queries * heads * levels * points * head_dim
            self.calls += 1

        return pre_hook

    def __enter__(self) -> "SamplingCounter":
        for module in self.model.modules():
            geometry = _msda_geometry(module)
            if geometry is not None:
                self._handles.append(module.register_forward_pre_hook(self._hook(geometry), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ---- formulas for attention kernels FlopCounterMode does not know (2 FLOP per MAC) --------------------------
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``[B, H, L, E] x [B, H, S, E] -> [B, H, L, Ev]``: ``Q K^T`` and ``A V``."""
    *batch_dims, length, e = query_shape
    s, ev = key_shape[-2], value_shape[-1]
    batch = 1
    for d in batch_dims:
        batch *= d
    return 2 * batch * length * s * e + 2 * batch * length * s * ev


def _native_mha_flops(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, out_shape=None,
                      **kwargs) -> int:
    """Fused ``nn.MultiheadAttention`` (batch_first ``[B, L, E]``): q/k/v/out projections + attention."""
    b, length, e = query_shape
    s = key_shape[1]
    projections = 2 * b * (2 * length + 2 * s) * e * e  # q and out on L tokens, k and v on S tokens
    attention = 2 * b * length * s * e * 2  # Q K^T and A V over all heads (H * E/H = E)
    return projections + attention


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    # FlopCounterMode passes custom formulas through its shape wrapper itself (tensors arrive as shapes).
    table = {}
    for name, fn in (("_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu_flops),
                     ("_native_multi_head_attention", _native_mha_flops)):
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            table[packet] = fn
    return table


EXTRA_FLOP_FORMULAS = _extra_formulas()


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also knows the CPU attention kernels (:data:`EXTRA_FLOP_FORMULAS`)."""
    return FlopCounterMode(display=False, custom_mapping=dict(EXTRA_FLOP_FORMULAS))


@contextlib.contextmanager
def stage_hook(model: nn.Module, fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(stage)`` as each stage of a forward of ``model`` begins (the detector's
    ``torch.profiler.record_function`` ranges, :data:`focus_detr.model.stages.STAGES`), then ``fn("end")``
    after the last one (before the output packing).

    Costs a Python call per stage while active (:func:`focus_detr.model.stages.observe_stages`), nothing
    outside the block; ``model`` is not modified (any model whose forward runs the stages works).
    """
    del model  # the stages are the model's own; kept in the signature for the callers
    with observe_stages(fn):
        yield


@dataclass
class FlopCount:
    """FLOPs of one forward pass, per stage (``counter`` = FlopCounterMode, ``sampling`` = deformable sampling).

    ``by_module``: top-level module name -> counter FLOPs; ``by_op``: aten op -> counter FLOPs.
    """

    counter: dict[str, int] = field(default_factory=dict)
    sampling: dict[str, int] = field(default_factory=dict)
    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)
    sampling_elements: int = 0

    def total(self, stage: str | None = None) -> int:
        if stage is None:
            return sum(self.counter.values()) + sum(self.sampling.values())
        return self.counter.get(stage, 0) + self.sampling.get(stage, 0)


def _module_totals(fc: FlopCounterMode) -> tuple[dict[str, int], dict[str, int]]:
    counts = fc.get_flop_counts()
    by_op = {str(op): int(v) for op, v in counts.get("Global", {}).items()}
    by_module: dict[str, int] = {}
    for name, ops in counts.items():
        if name.count(".") == 1:  # "<RootClass>.<child>"
            by_module[name.split(".", 1)[1]] = int(sum(ops.values()))
    return by_module, by_op


def count_stage_flops(model: nn.Module, run: Callable[[], Any]) -> tuple[FlopCount, Any]:
    """Count the FLOPs of ``run()`` (one forward of ``model``), split by the stage markers of ``model``.

    Returns the count and what ``run`` returned. Work before the first marker is reported as stage
    ``"pre"`` if any (there is none for :class:`~focus_detr.model.FocusDETR`).
    """
    marks: list[tuple[str, int, int]] = []
    with flop_counter() as fc, SamplingCounter(model) as sampler:

        def on_stage(stage: str) -> None:
            marks.append((stage, fc.get_total_flops(), sampler.flops))

        with stage_hook(model, on_stage):
            result = run()
        marks.append(("__after__", fc.get_total_flops(), sampler.flops))
    out = FlopCount(sampling_elements=sampler.elements)
    previous = ("pre", 0, 0)
    for mark in marks:
        stage, c0, s0 = previous
        c1, s1 = mark[1], mark[2]
        if stage == "end":  # output packing after the last marker: attribute to the decoder stage
            stage = "decoder"
        if stage != "pre" or c1 or s1:
            out.counter[stage] = out.counter.get(stage, 0) + c1 - c0
            out.sampling[stage] = out.sampling.get(stage, 0) + s1 - s0
        previous = mark
    out.by_module, out.by_op = _module_totals(fc)
    return out, result


def count_flops(model: nn.Module, run: Callable[[], Any]) -> FlopCount:
    """Total FLOPs of ``run()`` without stage markers (any model, e.g. the transformers anchor): everything
    goes to stage ``"total"``; ``by_module`` splits the counter's share by top-level module."""
    with flop_counter() as fc, SamplingCounter(model) as sampler:
        run()
    out = FlopCount(counter={"total": fc.get_total_flops()}, sampling={"total": sampler.flops},
                    sampling_elements=sampler.elements)
    out.by_module, out.by_op = _module_totals(fc)
    return out
