"""Visualisation: detections drawn on images, Focus-DETR's token maps, and small report plots.

Depends only on numpy, Pillow and (lazily, inside the plotting functions) matplotlib; never on the
model builder or the engine, so it can explain outputs loaded from anywhere.
"""

from focus_detr.viz.draw import PALETTE, class_color, draw_detections, to_pil_rgb
from focus_detr.viz.focus_maps import (
    explain_arrays,
    explain_figure,
    finest_level_map,
    kept_share_map,
    level_strides,
    save_figure,
    split_levels,
    token_mask,
    token_positions,
    valid_token_maps,
)
from focus_detr.viz.plots import plot_benchmark_bars, plot_loss_curve

__all__ = [
    "PALETTE",
    "class_color",
    "draw_detections",
    "explain_arrays",
    "explain_figure",
    "finest_level_map",
    "kept_share_map",
    "level_strides",
    "plot_benchmark_bars",
    "plot_loss_curve",
    "save_figure",
    "split_levels",
    "to_pil_rgb",
    "token_mask",
    "token_positions",
    "valid_token_maps",
]
