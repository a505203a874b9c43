"""Where the time goes: ``torch.profiler`` self-time per operator, split by the detector's stages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from .flops import stage_hook

_PREFIX = "stage:"


def profile_by_stage(model: nn.Module, run: Callable[[], Any], top: int = 8) -> dict[str, Any]:
    """Profile one ``run()`` (a forward of ``model``); return per stage its total and its ``top`` operators by
    self CPU time (milliseconds). Each stage is wrapped in a ``record_function("stage:<name>")`` range."""
    current: list[Any] = []

    def on_stage(stage: str) -> None:
        if current:
            current.pop().__exit__(None, None, None)
        if stage != "end":
            rf = record_function(_PREFIX + stage)
            rf.__enter__()
            current.append(rf)

    with profile(activities=[ProfilerActivity.CPU]) as prof, stage_hook(model, on_stage), torch.no_grad():
        try:
            run()
        finally:
            if current:
                current.pop().__exit__(None, None, None)
    per_stage: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    for ev in prof.events():
        if ev.name.startswith(_PREFIX):
            stage = ev.name[len(_PREFIX):]
            totals[stage] = totals.get(stage, 0.0) + ev.cpu_time_total / 1000.0
            continue
        parent = ev.cpu_parent
        while parent is not None and not parent.name.startswith(_PREFIX):
            parent = parent.cpu_parent
        stage = parent.name[len(_PREFIX):] if parent is not None else "outside"
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
