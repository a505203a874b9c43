"""Wall-clock timing of one forward pass, split by the detector's stage markers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .flops import stage_hook


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work (no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed_stages(model: nn.Module, run: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """Seconds per stage of one ``run()`` (a forward of ``model``) and ``"total"`` (the whole call).

    Each stage runs from its marker to the next; the short output packing after ``"end"`` counts in
    ``"total"`` only.
    """
    sync = synchronizer(device)
    marks: list[tuple[str, float]] = []

    def on_stage(stage: str) -> None:
        sync()
        marks.append((stage, time.perf_counter()))

    with stage_hook(model, on_stage):
        sync()
        start = time.perf_counter()
        run()
        sync()
        stop = time.perf_counter()
    out: dict[str, float] = {}
    for (stage, t0), (_, t1) in zip(marks, marks[1:]):
        out[stage] = out.get(stage, 0.0) + t1 - t0
    out["total"] = stop - start
    return out


def timed_modules(model: nn.Module, run: Callable[[], Any], modules: dict[str, nn.Module],
                  device: torch.device) -> dict[str, float]:
    """Seconds spent inside each named submodule during ``run()`` (forward hooks), plus ``"total"``."""
    sync = synchronizer(device)
    spent = {name: 0.0 for name in modules}
    starts: dict[str, float] = {}
    handles = []
    for name, module in modules.items():
        def pre(_m, _a, name=name):
            sync()
            starts[name] = time.perf_counter()

        def post(_m, _a, _o, name=name):
            sync()
            spent[name] += time.perf_counter() - starts.pop(name)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        sync()
        start = time.perf_counter()
        run()
        sync()
        spent["total"] = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    return spent


def interleaved(runners: dict[str, Callable[[], dict[str, float]]], repeats: int, warmup: int = 1,
                progress: Callable[[str], None] | None = None) -> dict[str, list[dict[str, float]]]:
    """Run every runner ``warmup`` times, then ``repeats`` rounds in which each runs once.

    The order rotates from round to round so that no runner always follows the same one (a slower runner
    heating the CPU, or caches left by the previous one, then average out). Returns per runner the list of
    its timing dicts from the measured rounds.
    """
    names = list(runners)
    for w in range(warmup):
        for name in names:
            if progress:
                progress(f"warm-up {w + 1}/{warmup}: {name}")
            runners[name]()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(runners[name]())
            if progress:
                progress(f"round {r + 1}/{repeats}: {name} {samples[name][-1]['total'] * 1000:.0f} ms")
    return samples


def summarize(samples: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per key: median, min, max and spread (max-min)/median, in milliseconds, plus the raw values."""
    keys: list[str] = []
    for s in samples:
        keys += [k for k in s if k not in keys]
    out = {}
    for k in keys:
        values = [s[k] * 1000.0 for s in samples if k in s]
        med = statistics.median(values)
        out[k] = {"median_ms": med, "min_ms": min(values), "max_ms": max(values),
                  "spread": (max(values) - min(values)) / med if med > 0 else 0.0, "ms_all": values}
    return out
