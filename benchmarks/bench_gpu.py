#!/usr/bin/env python
"""The whole GPU measurement in one go (driven by benchmarks/gpu.sh): frames per second at 800x1333 for
focus / dense / sparse in float32 and under autocast (AMP), training-step time and peak memory per mode, and
``torch.compile`` attempted on the focus model (what breaks is reported, not fatal). Writes ``OUT/gpu.md``
(Markdown tables) and ``OUT/gpu.json``.

    python benchmarks/bench_gpu.py --out runs/gpu                       # on a CUDA machine
    python benchmarks/bench_gpu.py --dry-run --out /tmp/gpu-dry         # CPU, tiny preset, seconds: checks the script

Every part runs under a time budget (``--budget-s``, default 420 s: under 8 minutes with start-up); a part
that does not fit is skipped and listed as such. Each part that fails is reported with its one-line error and
the rest go on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

try:
    import focus_detr  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import torch  # noqa: E402

from focus_detr.bench import build_mode_models, make_batch, parse_size  # noqa: E402
from focus_detr.bench.peak import measure_peaks  # noqa: E402
from focus_detr.bench.train_step import _make_stepper, random_targets  # noqa: E402

MODES = ("focus", "dense", "sparse")


def one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:300] if text else type(error).__name__


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fps(model, batch, device: torch.device, amp_dtype: torch.dtype | None, warmup: int, iters: int) -> dict[str, Any]:
    """Frames per second of ``model(batch)`` (batch 1), median of per-iteration times, and peak memory."""
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        for i in range(warmup + iters):
            sync(device)
            t0 = time.perf_counter()
            model(batch)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"ms": med * 1000, "fps": 1.0 / med, "min_ms": min(times) * 1000, "iters": iters}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def train_steps(model, images, targets, device: torch.device, amp_dtype: torch.dtype | None, warmup: int,
                steps: int) -> dict[str, Any]:
    step = _make_stepper(model, images, targets, 1e-4, lambda: sync(device))
    if amp_dtype is not None:
        inner = step

        def step() -> float:  # type: ignore[no-redef]
            with torch.autocast(device.type, dtype=amp_dtype):
                return inner()
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [step() for _ in range(steps)]
    med = statistics.median(times)
    out = {"step_ms": med * 1000, "images_per_s": len(targets) / med, "steps": steps}
    if device.type == "cuda":
        out["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


COMPILE_CHILD = r"""
import json, sys, time, torch
from focus_detr.bench import build_mode_models, make_batch
preset, h, w, device, backend, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
dev = torch.device(device)
models, _ = build_mode_models(preset, (mode,), 0, dev)
model = models[mode]
batch = make_batch(model, (h, w)).to(dev)
sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
out = {"backend": backend, "mode": mode}
with torch.no_grad():
    sync(); t0 = time.perf_counter(); model(batch); sync(); out["eager_ms"] = (time.perf_counter() - t0) * 1000
    compiled = torch.compile(model, backend=backend)
    t0 = time.perf_counter(); compiled(batch); sync(); out["first_call_s"] = time.perf_counter() - t0
    times = []
    for _ in range(5):
        sync(); t0 = time.perf_counter(); compiled(batch); sync(); times.append(time.perf_counter() - t0)
    times.sort(); out["compiled_ms"] = times[len(times) // 2] * 1000
    t0 = time.perf_counter(); model(batch); sync(); out["eager_again_ms"] = (time.perf_counter() - t0) * 1000
try:
    import torch._dynamo as dynamo
    explanation = dynamo.explain(model)(batch)
    out["graph_breaks"] = int(explanation.graph_break_count)
    out["break_reasons"] = sorted({str(b.reason).splitlines()[0][:160] for b in explanation.break_reasons})[:12]
except Exception as e:  # explain is best effort
    out["explain_error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
print("RESULT " + json.dumps(out))
"""


def try_compile(preset: str, size: tuple[int, int], device: str, backend: str, timeout: float) -> dict[str, Any]:
    """torch.compile of the focus model in a child process (a hang or a crash cannot take this run down)."""
    cmd = [sys.executable, "-c", COMPILE_CHILD, preset, str(size[0]), str(size[1]), device, backend, "focus"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"backend": backend, "error": f"did not finish in {timeout:.0f} s (compilation time)"}
    lines = [ln[7:] for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        err = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        last = next((ln for ln in reversed(err) if "Error" in ln or "error" in ln), err[-1] if err else "no output")
        return {"backend": backend, "error": f"exit code {proc.returncode}: {last[:300]}"}
    return json.loads(lines[-1])


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                            "python": platform.python_version(), "device": str(device),
                            "cuda": torch.version.cuda, "platform": platform.platform()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    bf16_supported=torch.cuda.is_bf16_supported())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            pass
    from focus_detr.ops import ms_deform_attn as msda

    resolve = getattr(msda, "implementation_for", None)
    info["msda_implementation"] = resolve(device) if resolve else msda.current_implementation()
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    budget = Budget(args.budget_s)
    size, train_size = parse_size(args.size), parse_size(args.train_size)
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    say = lambda m: print(f"[gpu] {m} ({budget.left():.0f} s left)", file=sys.stderr, flush=True)  # noqa: E731
    report: dict[str, Any] = {"machine": machine(device), "preset": args.preset, "size": list(size),
                              "train": {"preset": args.train_preset, "size": list(train_size), "batch": args.train_batch},
                              "amp_dtype": str(amp_dtype).replace("torch.", ""), "dry_run": args.dry_run,
                              "inference": {}, "training": {}, "compile": None, "skipped": [], "errors": []}

    say("matmul peak (fp32, bf16, fp16)")
    try:
        report["peaks"] = measure_peaks(("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32",), (1,),
                                        device, trials=2, trial_seconds=0.1 if args.dry_run else 0.5)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        report["errors"].append(f"peak: {one_line(e)}")

    say(f"building {', '.join(MODES)} ({args.preset})")
    models, _ = build_mode_models(args.preset, MODES, 0, device)
    batch = make_batch(models["focus"], size).to(device)
    for precision, dtype in (("fp32", None), (f"amp-{report['amp_dtype']}", amp_dtype)):
        for mode in MODES:
            key = f"{mode} {precision}"
            if budget.left() < args.reserve_s:
                report["skipped"].append(f"inference {key}: out of time")
                continue
            say(f"inference {key}")
            try:
                report["inference"].setdefault(precision, {})[mode] = fps(models[mode], batch, device, dtype,
                                                                         args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001
                report["errors"].append(f"inference {key}: {one_line(e)}")
                if args.verbose:
                    traceback.print_exc()
    del models, batch
    if device.type == "cuda":
        torch.cuda.empty_cache()

    say(f"training steps ({args.train_preset}, batch {args.train_batch} at {args.train_size})")
    for precision, dtype in (("fp32", None), (f"amp-{report['amp_dtype']}", amp_dtype)):
        for mode in MODES:
            key = f"{mode} {precision}"
            if budget.left() < args.reserve_s:
                report["skipped"].append(f"training {key}: out of time")
                continue
            say(f"training {key}")
            try:
                tm, _ = build_mode_models(args.train_preset, (mode,), 0, device)
                model = tm[mode]
                images = make_batch(model, train_size, args.train_batch, 0).to(device)
                targets = [{k: v.to(device) for k, v in t.items()}
                           for t in random_targets(args.train_batch, model.cfg.num_classes, 0)]
                report["training"].setdefault(precision, {})[mode] = train_steps(
                    model, images, targets, device, dtype, args.train_warmup, args.train_steps)
                del tm, model
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                report["errors"].append(f"training {key}: {one_line(e)}")
                if args.verbose:
                    traceback.print_exc()

    if args.compile_backend == "none":
        report["skipped"].append("torch.compile: --compile-backend none")
    elif budget.left() < 30:
        report["skipped"].append("torch.compile: out of time")
    else:
        timeout = max(20.0, budget.left() - 10)
        say(f"torch.compile (backend {args.compile_backend}, focus, at most {timeout:.0f} s)")
        report["compile"] = try_compile(args.preset, size, str(device), args.compile_backend, timeout)
    return report


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# GPU measurement{' (DRY RUN on ' + m['device'] + ', not a GPU result)' if report['dry_run'] else ''}", "",
             f"{m.get('gpu', m['device'])}, driver {m.get('driver', '-')}, CUDA {m.get('cuda')}, torch {m['torch']}, "
             f"{m['date']}; deformable attention: {m.get('msda_implementation')}; random weights, batch 1, "
             f"{report['preset']} at {report['size'][0]}x{report['size'][1]}; AMP = autocast {report['amp_dtype']}.", ""]
    if report.get("peaks"):
        lines.append("Matmul peak (torch.mm): " + ", ".join(f"{p['dtype']} {p['gflops']:.0f} GFLOP/s"
                                                           for p in report["peaks"]))
        lines.append("")
    lines += ["| mode | fp32 ms | fp32 FPS | AMP ms | AMP FPS | AMP speed-up | fp32 peak MiB | AMP peak MiB | vs dense (fp32 / AMP) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    inf = report["inference"]
    precisions = list(inf)
    fp32 = inf.get("fp32", {})
    amp = inf.get(precisions[1], {}) if len(precisions) > 1 else {}
    f = lambda v, fmt="{:.1f}": "-" if v is None else fmt.format(v)  # noqa: E731
    for mode in MODES:
        a, b = fp32.get(mode, {}), amp.get(mode, {})
        da, db = fp32.get("dense", {}), amp.get("dense", {})
        ratio = lambda x, y: x["ms"] / y["ms"] if x.get("ms") and y.get("ms") else None  # noqa: E731
        lines.append(f"| {mode} | {f(a.get('ms'))} | {f(a.get('fps'))} | {f(b.get('ms'))} | {f(b.get('fps'))} | "
                     f"{f(ratio(a, b), '{:.2f}x')} | {f(a.get('peak_mem_mb'), '{:.0f}')} | {f(b.get('peak_mem_mb'), '{:.0f}')} | "
                     f"{f(ratio(a, da), '{:.2f}')} / {f(ratio(b, db), '{:.2f}')} |")
    t = report["train"]
    lines += ["", f"Training step ({t['preset']}, batch {t['batch']} at {t['size'][0]}x{t['size'][1]}, forward + loss + "
                  "backward + AdamW):", "",
              "| mode | fp32 step ms | fp32 images/s | fp32 peak MiB | AMP step ms | AMP images/s | AMP peak MiB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    tr = report["training"]
    tprec = list(tr)
    t32 = tr.get("fp32", {})
    tamp = tr.get(tprec[1], {}) if len(tprec) > 1 else {}
    for mode in MODES:
        a, b = t32.get(mode, {}), tamp.get(mode, {})
        lines.append(f"| {mode} | {f(a.get('step_ms'))} | {f(a.get('images_per_s'), '{:.2f}')} | "
                     f"{f(a.get('peak_mem_mb'), '{:.0f}')} | {f(b.get('step_ms'))} | {f(b.get('images_per_s'), '{:.2f}')} | "
                     f"{f(b.get('peak_mem_mb'), '{:.0f}')} |")
    c = report.get("compile")
    lines += ["", "torch.compile (focus): " + (
        "not attempted" if c is None else f"backend {c['backend']}: FAILED -- {c['error']}" if "error" in c else
        f"backend {c['backend']}: first call {c['first_call_s']:.1f} s, then {c['compiled_ms']:.1f} ms vs eager "
        f"{c['eager_again_ms']:.1f} ms; graph breaks: {c.get('graph_breaks', '?')}"
        + (" (" + "; ".join(c.get("break_reasons", [])) + ")" if c.get("break_reasons") else ""))]
    if report["errors"]:
        lines += ["", "Errors (each part that failed; the others ran):", ""] + [f"* {e}" for e in report["errors"]]
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(report["skipped"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpu", help="folder for gpu.md and gpu.json (default runs/gpu)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the script on the CPU: tiny preset, small sizes, few iterations (not a measurement)")
    p.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    p.add_argument("--preset", default=None, help="inference preset (default r50_4scale; tiny with --dry-run)")
    p.add_argument("--size", default=None, help="inference size HxW (default 800x1333; 128x160 with --dry-run)")
    p.add_argument("--iters", type=int, default=None, help="timed forwards per mode and precision (default 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards first (default 5)")
    p.add_argument("--train-preset", default=None, help="training-step preset (default r50_4scale)")
    p.add_argument("--train-size", default=None, help="training image size HxW (default 800x1333)")
    p.add_argument("--train-batch", type=int, default=2, help="images per training step (default 2)")
    p.add_argument("--train-steps", type=int, default=None, help="timed steps per mode (default 10)")
    p.add_argument("--train-warmup", type=int, default=None, help="untimed steps first (default 3)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend to try (default inductor; none to skip, the --dry-run default: "
                        "tracing the model takes minutes on a CPU)")
    p.add_argument("--budget-s", type=float, default=420.0, help="time budget of all parts (default 420)")
    p.add_argument("--reserve-s", type=float, default=None,
                   help="a part starts only with this much budget left (default 60; 0 with --dry-run)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing parts")
    args = p.parse_args(argv)
    dry = args.dry_run
    defaults = {"device": "cpu" if dry else "cuda", "preset": "tiny" if dry else "r50_4scale",
                "size": "96x128" if dry else "800x1333", "iters": 1 if dry else 30, "warmup": 0 if dry else 5,
                "train_preset": "tiny" if dry else "r50_4scale", "train_size": "96x128" if dry else "800x1333",
                "train_steps": 1 if dry else 10, "train_warmup": 0 if dry else 3,
                "compile_backend": "none" if dry else "inductor", "reserve_s": 0.0 if dry else 60.0}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.dry_run:
        args.train_batch = min(args.train_batch, 1)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu.sh: no CUDA GPU is visible to torch (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = run(args)
    with open(os.path.join(args.out, "gpu.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    text = markdown(report)
    with open(os.path.join(args.out, "gpu.md"), "w") as fh:
        fh.write(text)
    print(text, end="")
    print(f"wrote {os.path.join(args.out, 'gpu.md')} and gpu.json", file=sys.stderr)
    # a run where nothing could be measured is a failure; single failing parts are reported in the table
    return 1 if not report["inference"] else 0


if __name__ == "__main__":
    sys.exit(main())
