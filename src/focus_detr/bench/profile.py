"""Where the time goes: ``torch.profiler`` self-time per operator, split by the detector's stages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..model.stages import STAGE_PREFIX


def profile_by_stage(model: nn.Module, run: Callable[[], Any], top: int = 8) -> dict[str, Any]:
    """Profile one ``run()`` (a forward of ``model``); return per stage its total and its ``top`` operators by
    self CPU time (milliseconds). The stages are the detector's own ``record_function("focus_detr.<name>")``
    ranges (:mod:`focus_detr.model.stages`)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        run()
    per_stage: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for ev in prof.events():
        if ev.name.startswith(STAGE_PREFIX):
            stage = ev.name[len(STAGE_PREFIX):]
            totals[stage] = totals.get(stage, 0.0) + ev.cpu_time_total / 1000.0
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(STAGE_PREFIX):
            parent = parent.cpu_parent
        stage = parent.name[len(STAGE_PREFIX):] if parent is not None else "outside"
        ops = per_stage.setdefault(stage, {})
        ops[ev.name] = ops.get(ev.name, 0.0) + ev.self_cpu_time_total / 1000.0
    out: dict[str, Any] = {}
    for stage, ops in per_stage.items():
        ranked = sorted(ops.items(), key=lambda kv: -kv[1])
        out[stage] = {"total_ms": totals.get(stage), "top_ops_self_ms": ranked[:top]}
    return out


def format_profile(result: dict[str, Any]) -> str:
    lines = []
    for stage, r in result.items():
        total = r["total_ms"]
        lines.append(f"{stage}: {total:.1f} ms" if total is not None else f"{stage}:")
        for op, ms in r["top_ops_self_ms"]:
            lines.append(f"    {ms:9.1f} ms  {op}")
    return "\n".join(lines) + "\n"
