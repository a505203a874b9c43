"""Small report plots: a training loss curve and per-stage latency bars of the encoder modes.

Figures are drawn by Agg without pyplot (no display needed, the caller's backend is left alone).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from focus_detr.viz.focus_maps import new_figure, save_figure

# Keys tried, in order, for the total loss and for a latency value.
TOTAL_LOSS_KEYS = ("loss", "total_loss", "loss_total")
LATENCY_KEYS = ("ms", "latency_ms", "mean_ms", "time_ms")
# Encoder modes in the order they are usually compared; other modes follow alphabetically.
MODE_ORDER = ("focus", "dense", "sparse")
MODE_COLORS = {"focus": "#d62728", "dense": "#1f77b4", "sparse": "#2ca02c"}
_AUX_SUFFIX = re.compile(r"_(\d+|dn(_\d+)?|enc|interm)$")  # per-decoder-layer / denoising / encoder copies


def _float(value: Any) -> float | None:
    """A finite float from a number / 0-d tensor, else None."""
    try:
        out = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred running mean that keeps the length (the ends average over what exists)."""
    if window <= 1 or len(values) < 3:
        return values
    kernel = np.ones(window)
    num = np.convolve(values, kernel, mode="same")
    den = np.convolve(np.ones_like(values), kernel, mode="same")
    return num / den


def main_loss_components(history: Sequence[Mapping[str, Any]], max_components: int = 4) -> list[str]:
    """The largest "headline" loss terms: ``loss_*`` keys without aux / denoising / encoder suffixes."""
    totals: dict[str, float] = {}
    for row in history:
        for key, value in row.items():
            v = _float(value)
            if v is None or key in TOTAL_LOSS_KEYS or "loss" not in key or _AUX_SUFFIX.search(key):
                continue
            totals[key] = totals.get(key, 0.0) + abs(v)
    return sorted(totals, key=lambda k: -totals[k])[:max_components]


def plot_loss_curve(
    history: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    components: Sequence[str] | None = None,
    smooth: int | None = None,
    title: str = "training loss",
) -> None:
    """Plot the total loss and its main components against the iteration; saves a PNG (or PDF/SVG).

    history:    one dict per logged step with ``"iter"`` and float (or 0-d tensor) loss values, e.g.
                ``{"iter": 100, "loss": 12.3, "loss_class": 1.1, "loss_bbox": 0.4, "loss_giou": 0.9}``.
                The total is ``"loss"`` (or ``"total_loss"``); missing / non-finite values are skipped.
    components: loss keys to draw besides the total; default the 4 largest ``loss_*`` terms without
                ``_0.._4`` / ``_dn`` / ``_enc`` / ``_interm`` suffixes.
    smooth:     running-mean window; default ~1/25 of the points. Raw values are drawn faintly behind.

    The y axis is logarithmic when all values are positive and span more than a factor 10.
    """
    if not history:
        raise ValueError("plot_loss_curve needs at least one logged step")
    total_key = next((k for k in TOTAL_LOSS_KEYS if any(k in row for row in history)), None)
    if components is None:
        components = main_loss_components(history)
    keys = ([total_key] if total_key else []) + list(components)
    if not keys:
        raise ValueError(f"no loss keys found in history (first row: {sorted(history[0])})")
    window = smooth if smooth is not None else max(1, len(history) // 25)

    fig = new_figure((7.0, 4.2))
    ax = fig.add_subplot()
    all_values: list[float] = []
    colors = ["black", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    for i, key in enumerate(keys):
        points = [(row["iter"], _float(row.get(key))) for row in history if "iter" in row]
        points = [(it, v) for it, v in points if v is not None]
        if not points:
            continue
        iters = np.array([p[0] for p in points], dtype=np.float64)
        values = np.array([p[1] for p in points], dtype=np.float64)
        all_values.extend(values.tolist())
        color = colors[i % len(colors)]
        if window > 1:
            ax.plot(iters, values, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(iters, _smooth(values, window), color=color, linewidth=2.0 if key == total_key else 1.4, label=key)
    vals = np.array(all_values)
    if vals.size and (vals > 0).all() and vals.max() / vals.min() > 10:
        ax.set_yscale("log")  # components are often 10-100x smaller than the total
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss" + (f" (running mean of {window})" if window > 1 else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False)
    save_figure(fig, path)


def plot_benchmark_bars(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "latency per stage",
    unit: str = "ms",
) -> None:
    """Grouped bars: one group per stage, one bar per encoder mode (focus / dense / sparse / ...).

    rows: one dict per measurement: ``{"mode": "focus", "stage": "encoder", "ms": 12.3}``; the value may
          also be under ``latency_ms`` / ``mean_ms`` / ``time_ms``, with an optional ``std_ms`` drawn as an
          error bar. Stages keep their order of first appearance.
    """
    if not rows:
        raise ValueError("plot_benchmark_bars needs at least one row")
    stages: list[str] = []
    modes: set[str] = set()
    table: dict[tuple[str, str], tuple[float, float | None]] = {}
    for row in rows:
        key = next((k for k in LATENCY_KEYS if k in row), None)
        if key is None:
            raise ValueError(f"row has none of the latency keys {LATENCY_KEYS}: {dict(row)}")
        stage, mode = str(row["stage"]), str(row["mode"])
        if stage not in stages:
            stages.append(stage)
        modes.add(mode)
        table[(stage, mode)] = (float(row[key]), _float(row.get("std_ms")))
    mode_list = [m for m in MODE_ORDER if m in modes] + sorted(modes - set(MODE_ORDER))

    fig = new_figure((max(5.0, 1.3 * len(stages) * max(1, len(mode_list)) / 2 + 2.0), 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(stages), dtype=np.float64)
    width = 0.8 / len(mode_list)
    fallback = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for i, mode in enumerate(mode_list):
        heights = np.array([table.get((s, mode), (np.nan, None))[0] for s in stages])
        errors = np.array([table.get((s, mode), (np.nan, None))[1] or 0.0 for s in stages])
        color = MODE_COLORS.get(mode, fallback[i % len(fallback)])
        offset = x + (i - (len(mode_list) - 1) / 2) * width
        bars = ax.bar(offset, heights, width * 0.92, label=mode, color=color,
                      yerr=errors if errors.any() else None, capsize=2)  # fmt: skip
        ax.bar_label(bars, labels=[f"{h:.1f}" if np.isfinite(h) else "" for h in heights], fontsize=7, padding=2)
    ax.set_xticks(x, stages)
    ax.set_ylabel(f"latency ({unit})")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.15)  # room for the value labels above the tallest bar
    ax.legend(title="encoder mode", fontsize=8, title_fontsize=8, frameon=False)
    save_figure(fig, path)
