"""The official optimiser and learning-rate schedules.

Optimiser (detrex ``configs/common/optim.py`` as the Focus-DETR configs use it): AdamW, lr 1e-4,
betas (0.9, 0.999), weight decay 1e-4 except on normalisation-layer parameters (weight decay 0), and lr 1e-5
(x0.1) for every parameter whose name contains ``backbone``.

Schedules (detrex ``coco_schedule.py``): step decay x0.1, no warm-up. The official numbers are in
iterations of 16 images on COCO train2017 (7500 iterations counted as one epoch):

=======  =========  ====================  =========================================
name     max_iter   lr x0.1 at            in epochs
=======  =========  ====================  =========================================
12ep     90 000     82 500                12 epochs, drop after 11
24ep     180 000    150 000               24 epochs, drop after 20
36ep     270 000    150 000               36 epochs, drop after 20 (the R50/R101 configs'
                                          ``lr_multiplier_24_36ep``; Swin 36ep configs drop at 30)
=======  =========  ====================  =========================================

On another dataset or batch size the schedule keeps its length *in epochs*: ``iters_per_epoch =
ceil(train_images / total_batch)``, ``max_iters = epochs * iters_per_epoch`` and the drops at the same
epoch fractions (:func:`schedule_for`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# name -> (epochs, epochs at which the lr is multiplied by 0.1)
SCHEDULES: dict[str, tuple[int, tuple[int, ...]]] = {
    "12ep": (12, (11,)),
    "24ep": (24, (20,)),
    "36ep": (36, (20,)),
}

_NORM_TYPES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                                 nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.LocalResponseNorm)


@dataclass(frozen=True)
class LRSchedule:
    """Step decay with optional linear warm-up; the lr factor is a pure function of the iteration, so the
    "scheduler state" in a checkpoint is just this dataclass."""

    max_iters: int
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    warmup_iters: int = 0
    warmup_factor: float = 0.001

    def factor(self, iteration: int) -> float:
        """Multiplier of the base lr for the step that starts at ``iteration`` (0-based)."""
        f = self.gamma ** sum(1 for m in self.milestones if iteration >= m)
        if iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            f *= self.warmup_factor * (1 - alpha) + alpha
        return f

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "LRSchedule":
        return cls(int(d["max_iters"]), tuple(int(m) for m in d["milestones"]), float(d["gamma"]),
                   int(d["warmup_iters"]), float(d["warmup_factor"]))


def schedule_for(name: str | None, num_train_images: int, total_batch_size: int, max_iters: int | None = None,
                 lr_steps: Sequence[int] | None = None, warmup_iters: int = 0) -> LRSchedule:
    """Build the schedule of a run.

    * ``name`` (``12ep`` / ``24ep`` / ``36ep``): length in epochs of this dataset at this total batch size,
      lr drops at the official epoch fractions.
    * ``max_iters`` overrides the length; with a ``name`` the drops stay at the same *fractions* of it.
    * ``lr_steps`` overrides the drop iterations.
    """
    if name is None and max_iters is None:
        raise ValueError("give a schedule name (12ep, 24ep, 36ep) or max_iters")
    fractions: tuple[float, ...] = ()
    if name is not None:
        if name not in SCHEDULES:
            raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
        epochs, drops = SCHEDULES[name]
        iters_per_epoch = max(1, math.ceil(num_train_images / total_batch_size))
        fractions = tuple(d / epochs for d in drops)
        if max_iters is None:
            max_iters = epochs * iters_per_epoch
    assert max_iters is not None
    if max_iters <= 0:
        raise ValueError(f"max_iters must be positive, got {max_iters}")
    if lr_steps is not None:
        milestones = tuple(sorted(int(s) for s in lr_steps))
    else:
        milestones = tuple(int(round(f * max_iters)) for f in fractions)
    return LRSchedule(int(max_iters), milestones, 0.1, int(warmup_iters))


def param_groups(model: nn.Module, lr: float, backbone_lr: float, weight_decay: float,
                 weight_decay_norm: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups: (backbone or not) x (normalisation layer or not).

    A parameter is a "backbone" parameter when its name contains ``backbone`` (the official rule) and a
    "norm" parameter when it belongs to a normalisation layer (LayerNorm / GroupNorm / BatchNorm ...).
    Frozen parameters (``requires_grad=False``) are left out. Each group records its ``base_lr``.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for param_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{param_name}" if module_name else param_name
            groups.setdefault(("backbone" in full, is_norm), []).append(p)
    out = []
    for (is_backbone, is_norm), params in sorted(groups.items()):
        group_lr = backbone_lr if is_backbone else lr
        out.append({
            "params": params,
            "lr": group_lr,
            "base_lr": group_lr,
            "weight_decay": weight_decay_norm if is_norm else weight_decay,
            "name": f"{'backbone' if is_backbone else 'transformer'}{'_norm' if is_norm else ''}",
        })
    return out


def build_optimizer(model: nn.Module, lr: float = 1e-4, backbone_lr: float = 1e-5, weight_decay: float = 1e-4,
                    betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (the official settings by default)."""
    return torch.optim.AdamW(param_groups(model, lr, backbone_lr, weight_decay), lr=lr, betas=betas,
                             weight_decay=weight_decay)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``base_lr * factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
