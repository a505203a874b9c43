"""Training cost: time and peak memory of one optimisation step (forward + loss + backward + AdamW step) per
encoder mode (focus / dense / sparse), at a stated image size.

Time: the modes' steps interleaved in one process (same weights at the start, same images and targets every
step), median over the measured steps. Memory: each mode in a fresh process (``python -m
focus_detr.bench.train_step --memory-child ...``): two steps first (so AdamW's moment buffers exist, as in any
real training), then the peak during one more step -- CPU: peak RSS after a reset of the kernel's high-water
mark (``VmHWM``, weights, gradients, optimizer state, activations, allocator caches and the runtime all
included) and its increase over the RSS before the step (activations + temporaries); CUDA:
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..allocator import reuse_freed_memory
from ..losses import HungarianMatcher, SetCriterion
from .memory import run_json_child
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


def _make_stepper(model, images, targets, lr: float, sync: Callable[[], None]) -> Callable[[], float]:
    """A function doing one training step of ``model`` and returning its seconds."""
    model.train()
    criterion = SetCriterion(model.cfg.num_classes, HungarianMatcher(), num_decoder_layers=model.cfg.decoder.num_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)

    def step() -> float:
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

    return step


def train_step_memory_in_this_process(preset: str, mode: str, batch: int, size: tuple[int, int], seed: int = 0,
                                      device: str = "cpu", lr: float = 1e-4) -> dict[str, Any]:
    """Peak memory of one training step of ``mode`` (after two unmeasured steps), in MiB; see the module doc."""
    from .memory import reset_peak_rss, status_kb, trim_heap

    dev = torch.device(device)
    sync = synchronizer(dev)
    models, _ = build_mode_models(preset, (mode,), seed, dev)
    model = models[mode]
    del models
    images = make_batch(model, size, batch, seed).to(dev)
    targets = [{k: v.to(dev) for k, v in t.items()} for t in random_targets(batch, model.cfg.num_classes, seed)]
    step = _make_stepper(model, images, targets, lr, sync)
    step()
    step()
    trim_heap()
    out: dict[str, Any] = {"mode": mode, "size": list(size), "batch": batch, "device": str(dev)}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out["step_ms"] = step() * 1000
        peak = torch.cuda.max_memory_allocated(dev)
        out.update(method="torch.cuda.max_memory_allocated", peak_mb=peak / 2**20, before_mb=before / 2**20,
                   increase_mb=(peak - before) / 2**20)
        return out
    rss_before = status_kb("VmRSS")
    reset = reset_peak_rss() and rss_before is not None
    out["step_ms"] = step() * 1000
    if reset:
        peak_kb = status_kb("VmHWM")
        out.update(method="VmHWM after clear_refs reset (peak RSS during the step)", peak_mb=peak_kb / 1024,
                   before_mb=rss_before / 1024, increase_mb=(peak_kb - rss_before) / 1024)
    else:
        import resource

        out.update(method="ru_maxrss (peak over the process life)", before_mb=None, increase_mb=None,
                   peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def measure_train_step_memory(preset: str, modes: Sequence[str], batch: int, size: tuple[int, int], seed: int = 0,
                              device: str = "cpu", threads: int | None = None,
                              timeout: float = 1800.0) -> dict[str, dict[str, Any]]:
    """:func:`train_step_memory_in_this_process` for each mode in its own fresh Python process."""
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        cmd = [sys.executable, "-m", "focus_detr.bench.train_step", "--memory-child", "--preset", preset,
               "--mode", mode, "--batch", str(batch), "--size", f"{size[0]}x{size[1]}", "--seed", str(seed),
               "--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        results[mode] = run_json_child(cmd, timeout, dict(os.environ))
    return results


def benchmark_train_step(
    preset: str = "tiny",
    modes: Sequence[str] = ("focus", "dense", "sparse"),
    batch: int = 2,
    size: tuple[int, int] = (320, 480),
    steps: int = 10,
    warmup: int = 2,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    lr: float = 1e-4,
    backbone_once: bool = False,
    memory: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Median time of a full training step per mode, steps interleaved across modes (same weights at start,
    same images and targets every step), and with ``memory`` the peak memory of a step per mode (fresh process
    each, see the module doc). Uses :class:`~focus_detr.losses.SetCriterion` with the default
    :class:`~focus_detr.losses.HungarianMatcher` and ``torch.optim.AdamW`` (weight decay 1e-4); the images are
    ``batch`` random images of ``size`` (HxW) with 1-6 random boxes each."""
    say = progress or (lambda _m: None)
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    sync = synchronizer(dev)
    models, _ = build_mode_models(preset, tuple(modes), seed, dev, backbone_once=backbone_once)
    first = models[modes[0]]
    images = make_batch(first, size, batch, seed).to(dev)
    targets = [{k: v.to(dev) for k, v in t.items()} for t in random_targets(batch, first.cfg.num_classes, seed)]
    steppers = {mode: _make_stepper(models[mode], images, targets, lr, sync) for mode in modes}
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
    result["ratios"] = {f"{m}/dense": result["modes"][m]["step_ms"] / result["modes"]["dense"]["step_ms"]
                        for m in names if m != "dense" and "dense" in names}
    if memory:
        say("train step: peak memory, one fresh process per mode")
        mem = measure_train_step_memory(preset, names, batch, size, seed, device, torch.get_num_threads())
        for m in names:
            result["modes"][m]["memory"] = mem[m]
        if "dense" in names and "increase_mb" in mem.get("dense", {}):
            for m in names:
                if m != "dense" and mem[m].get("increase_mb") and mem["dense"].get("increase_mb"):
                    result["ratios"][f"{m}/dense memory increase"] = mem[m]["increase_mb"] / mem["dense"]["increase_mb"]
    return result


def main(argv: list[str] | None = None) -> int:
    """The child process of :func:`measure_train_step_memory` (prints one JSON line)."""
    p = argparse.ArgumentParser(description="peak memory of one training step (child process)")
    p.add_argument("--memory-child", action="store_true", required=True)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--mode", default="focus")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", default="320x480")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    reuse_freed_memory()  # as the focus-detr command does: the memory measured is the command's
    from .models import parse_size

    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(train_step_memory_in_this_process(args.preset, args.mode, args.batch, parse_size(args.size),
                                                       args.seed, args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
