"""Training speed: images/s of one optimisation step (forward + loss + backward + AdamW step) per encoder mode."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..losses import HungarianMatcher, SetCriterion
from .models import build_mode_models, make_batch
from .timing import synchronizer


def random_targets(batch: int, num_classes: int, seed: int = 0, max_boxes: int = 6) -> list[dict[str, torch.Tensor]]:
    """1..``max_boxes`` random boxes per image (normalised cxcywh, inside the image) with random labels."""
    g = torch.Generator().manual_seed(seed + 1)
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, max_boxes + 1, (1,), generator=g))
        wh = 0.05 + 0.4 * torch.rand(n, 2, generator=g)
        c = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": torch.cat([c, wh], 1)})
    return targets


def benchmark_train_step(
    preset: str = "tiny",
    modes: Sequence[str] = ("focus", "dense"),
    batch: int = 2,
    size: tuple[int, int] = (320, 480),
    steps: int = 10,
    warmup: int = 2,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    lr: float = 1e-4,
    backbone_once: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median time of a full training step per mode, steps interleaved across modes (same weights at start,
    same images and targets every step). Uses :class:`~focus_detr.losses.SetCriterion` with the default
    :class:`~focus_detr.losses.HungarianMatcher` and ``torch.optim.AdamW`` (weight decay 1e-4)."""
    say = progress or (lambda _m: None)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = synchronizer(dev)
    models, _ = build_mode_models(preset, tuple(modes), seed, dev, backbone_once=backbone_once)
    first = models[modes[0]]
    images = make_batch(first, size, batch, seed).to(dev)
    targets = [{k: v.to(dev) for k, v in t.items()} for t in random_targets(batch, first.cfg.num_classes, seed)]
    steppers: dict[str, Callable[[], float]] = {}
    for mode in modes:
        model = models[mode].train()
        criterion = SetCriterion(model.cfg.num_classes, HungarianMatcher(),
                                 num_decoder_layers=model.cfg.decoder.num_layers)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

        def step(model=model, criterion=criterion, optimizer=optimizer) -> float:
            sync()
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            outputs = model(images, targets)
            losses = criterion(outputs, targets)
            loss = criterion.total(losses)
            loss.backward()
            optimizer.step()
            sync()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss in {model.cfg.encoder.mode} mode: {float(loss)}")
            return time.perf_counter() - t0

        steppers[mode] = step
    names = list(modes)
    for w in range(warmup):
        for name in names:
            steppers[name]()
    times: dict[str, list[float]] = {m: [] for m in names}
    for s in range(steps):
        shift = s % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(steppers[name]())
        say(f"train step {s + 1}/{steps}: " + ", ".join(f"{m} {times[m][-1] * 1000:.0f} ms" for m in names))
    result: dict[str, Any] = {"preset": preset, "batch": batch, "size": list(size), "steps": steps, "warmup": warmup,
                              "device": str(dev), "threads": torch.get_num_threads(), "optimizer": "AdamW",
                              "backbone_once": backbone_once,
                              "modes": {}}
    for m in names:
        med = statistics.median(times[m])
        result["modes"][m] = {"step_ms": med * 1000, "images_per_s": batch / med,
                              "spread": (max(times[m]) - min(times[m])) / med, "ms_all": [t * 1000 for t in times[m]]}
    if "focus" in names and "dense" in names:
        result["ratios"] = {"focus/dense": result["modes"]["focus"]["step_ms"] / result["modes"]["dense"]["step_ms"]}
    return result
