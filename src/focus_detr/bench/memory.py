"""Peak memory of one inference, each mode in a fresh process.

CPU: peak resident set size (RSS). In the child process the model is built, freed memory is handed back
(``gc`` + glibc ``malloc_trim``), the kernel's RSS high-water mark is reset (``/proc/self/clear_refs``,
Linux), one inference runs, and ``VmHWM`` is read: the peak RSS *during that inference*, weights and
runtime included. ``increase_mb`` subtracts the RSS just before the inference (mostly weights + libraries).
Where the reset is not possible, ``ru_maxrss`` (peak over the process life, model building included) is
reported instead and ``method`` says so. CUDA: ``torch.cuda.max_memory_allocated`` around the inference.

Run as ``python -m focus_detr.bench.memory --preset r50_4scale --mode focus --size 800x1333`` (prints JSON).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from typing import Any

from ..allocator import reuse_freed_memory


def status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_in_this_process(preset: str, mode: str, size: tuple[int, int], batch: int, seed: int,
                            device: str, backbone_once: bool = False) -> dict[str, Any]:
    """Build ``mode`` (or the transformers anchor), run one inference, return the memory figures (MiB)."""
    import torch

    from .anchor import ANCHOR_NAME, anchor_inputs, build_anchor
    from .models import build_mode_models, make_batch

    dev = torch.device(device)
    if mode == ANCHOR_NAME:
        models, _ = build_mode_models(preset, ("focus",), seed, "cpu")
        batch_ = make_batch(models["focus"], size, batch, seed)
        del models
        model = build_anchor(seed=seed).to(dev)
        inputs = anchor_inputs(batch_.tensor.to(dev), batch_.padding_mask.to(dev))
        run = lambda: model(**inputs)  # noqa: E731
    else:
        models, _ = build_mode_models(preset, (mode,), seed, dev, backbone_once=backbone_once)
        model = models[mode]
        del models
        batch_ = make_batch(model, size, batch, seed)
        run = lambda: model(batch_)  # noqa: E731
    trim_heap()
    out: dict[str, Any] = {"mode": mode, "size": list(size), "batch": batch, "device": device}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        with torch.no_grad():
            run()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        out.update(method="torch.cuda.max_memory_allocated", peak_mb=peak / 2**20, before_mb=before / 2**20,
                   increase_mb=(peak - before) / 2**20)
        return out
    rss_before = status_kb("VmRSS")
    reset = reset_peak_rss() and rss_before is not None
    with torch.no_grad():
        run()
    if reset:
        peak_kb = status_kb("VmHWM")
        out.update(method="VmHWM after clear_refs reset (peak RSS during the inference)",
                   peak_mb=peak_kb / 1024, before_mb=rss_before / 1024, increase_mb=(peak_kb - rss_before) / 1024)
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        out.update(method="ru_maxrss (peak over the process life, model building included)",
                   peak_mb=maxrss / 1024, before_mb=None if rss_before is None else rss_before / 1024,
                   increase_mb=None)
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def measure_peak_memory(preset: str, modes: list[str], size: tuple[int, int], batch: int = 1, seed: int = 0,
                        device: str = "cpu", threads: int | None = None, timeout: float = 900.0,
                        backbone_once: bool = False) -> dict[str, dict[str, Any]]:
    """Run :func:`measure_in_this_process` for each mode in its own fresh Python process, one after another."""
    results: dict[str, dict[str, Any]] = {}
    for mode in modes:
        cmd = [sys.executable, "-m", "focus_detr.bench.memory", "--preset", preset, "--mode", mode,
               "--size", f"{size[0]}x{size[1]}", "--batch", str(batch), "--seed", str(seed), "--device", device]
        if threads:
            cmd += ["--threads", str(threads)]
        if backbone_once:
            cmd.append("--backbone-once")
        env = dict(os.environ)
        # the child selects the same deformable attention implementation as this process
        from ..ops.ms_deform_attn import current_implementation

        env["FOCUS_DETR_MSDA_IMPL"] = current_implementation()
        results[mode] = run_json_child(cmd, timeout, env)
    return results


def run_json_child(cmd: list[str], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Run a measuring child process and return the last JSON object line of its stdout, or ``{"error": ...}``
    (timeout, non-zero exit or no JSON line; the error names the exit code and the last lines of output)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit code {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="r50_4scale")
    p.add_argument("--mode", default="focus")
    p.add_argument("--size", default="800x1333")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backbone-once", action="store_true")
    args = p.parse_args(argv)
    reuse_freed_memory()  # as the focus-detr command does: the memory measured is the command's
    import torch

    from .models import parse_size

    if args.threads:
        torch.set_num_threads(args.threads)
    impl = os.environ.get("FOCUS_DETR_MSDA_IMPL")
    if impl:
        from ..ops import ms_deform_attn as msda

        if impl in msda.available_implementations():
            msda.select_implementation(impl)
    result = measure_in_this_process(args.preset, args.mode, parse_size(args.size), args.batch, args.seed,
                                     args.device, args.backbone_once)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
