"""Training losses: Hungarian matcher, focal losses, foreground token targets and the full criterion.

Depends on ``focus_detr.ops`` and ``focus_detr.model.outputs`` only.
"""

from focus_detr.losses.criterion import SET_LOSS_NAMES, SetCriterion, default_weight_dict
from focus_detr.losses.focal import foreground_focal_loss, sigmoid_focal_loss
from focus_detr.losses.foreground_targets import DEFAULT_SCALE_RANGES, DEFAULT_STRIDES, foreground_targets
from focus_detr.losses.matcher import HungarianMatcher, MatchIndices

__all__ = [
    "DEFAULT_SCALE_RANGES",
    "DEFAULT_STRIDES",
    "HungarianMatcher",
    "MatchIndices",
    "SET_LOSS_NAMES",
    "SetCriterion",
    "default_weight_dict",
    "foreground_focal_loss",
    "foreground_targets",
    "sigmoid_focal_loss",
]
