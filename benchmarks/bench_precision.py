"""Inference precision and efficiency against the machine's own matmul peak (issue #14 items 1, 2 and 6).

Measures, in one process and one run (ratios only mean something within a run):

* the machine's float32 and bfloat16 matrix-multiply peak (``n x n`` products, best of a few) at the chosen
  thread count, re-measured in every round, so a loaded machine slows both sides alike;
* a randomly initialised model (default ``r50_4scale``, focus mode) in four variants, interleaved round by
  round: ``fp32`` as loaded, ``fp32+fold`` (FrozenBN folded), ``fp32+fold+nhwc`` (also channels-last),
  ``bf16`` (:func:`focus_detr.optimize_for_inference` with ``precision="bf16"``); per variant the time per
  stage, GFLOP/s (FLOPs from :mod:`focus_detr.bench.flops`, 2 FLOP per multiply-add) and the fraction of the
  same round's matmul peak of its dtype (median over rounds);
* optionally (``--profile``) where the time of the fastest fp32 variant goes (``torch.profiler``, top ops);
* optionally (``--demo RUN_DIR``) held-out COCO AP of the demo-trained model in fp32 vs bf16 (and fp32+fold),
  on the run's validation split.

    python benchmarks/bench_precision.py --size 480x640 --threads 1 --repeats 3 --profile \\
        --demo /work/runs/demo --json precision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import focus_detr
from focus_detr.allocator import reuse_freed_memory
from focus_detr.bench.core import machine_info
from focus_detr.bench.flops import count_stage_flops
from focus_detr.bench.models import make_batch, parse_size
from focus_detr.bench.timing import timed_stages
from focus_detr.model.optimize import cpu_has_bf16_units, optimize_for_inference

STAGES = ("backbone", "preparation", "token_selection", "encoder", "query_selection", "decoder")


def matmul_peak(dtype: torch.dtype, n: int = 1024, runs: int = 3) -> dict[str, float]:
    """GFLOP/s of ``[n, n] x [n, n]`` products in ``dtype`` (2 n^3 FLOP each), through both ``torch.mm`` and
    ``F.linear`` (they can reach different kernels: bfloat16 ``mm`` on a CPU without bf16 units takes a much
    slower path than ``linear``), the faster of the two: ``{"wall": best wall-clock rate, "cpu": best rate per
    CPU second of this process}``. The CPU-time rate is what one thread achieves while it runs, so on a machine
    shared with other processes it is the fair denominator for a model also timed in CPU seconds."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    best_wall = best_cpu = float("inf")
    for op in (torch.mm, torch.nn.functional.linear):
        op(a, b)  # warm-up: thread pool, kernel selection
        for _ in range(runs):
            wall, cpu = time.perf_counter(), time.process_time()
            op(a, b)
            best_cpu = min(best_cpu, time.process_time() - cpu)
            best_wall = min(best_wall, time.perf_counter() - wall)
    return {"wall": 2 * n**3 / best_wall / 1e9, "cpu": 2 * n**3 / best_cpu / 1e9}


def build_variants(model: focus_detr.FocusDETR) -> dict[str, tuple[torch.nn.Module, str]]:
    """name -> (model, dtype whose peak it is compared with)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bf16-without-units warning: this benchmark says it in its report
        return {
            "fp32": (model, "fp32"),
            "fp32+fold": (optimize_for_inference(model, "fp32", channels_last=False), "fp32"),
            "fp32+fold+nhwc": (optimize_for_inference(model, "fp32", channels_last=True), "fp32"),
            "bf16": (optimize_for_inference(model, "bf16", channels_last=False), "bf16"),
        }


def speed(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = focus_detr.build_model(args.preset).eval()
    batch = make_batch(model, args.size, 1, args.seed)
    variants = build_variants(model)
    if args.no_bf16_speed:
        del variants["bf16"]
        args.bf16_rounds = 1  # its peak is still measured once
    with torch.no_grad():
        flops, _ = count_stage_flops(model, lambda: model(batch))
    total_flops = flops.total()
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    peaks: list[dict[str, float]] = []
    bf16_peak: dict[str, float] | None = None
    with torch.no_grad():
        for name, (m, dtype) in variants.items():  # warm-up (first-call allocations, oneDNN primitive caches)
            if dtype == "bf16":
                continue  # minutes where bf16 is emulated; its first call is timed as it is
            print(f"warm-up {name}", file=sys.stderr, flush=True)
            m(batch)
        for round_ in range(args.repeats):
            fp32_peak = matmul_peak(torch.float32)
            if round_ < args.bf16_rounds or bf16_peak is None:  # slow where bf16 is emulated: not every round
                bf16_peak = matmul_peak(torch.bfloat16, n=args.bf16_peak_n)
            peak = {"fp32": fp32_peak["wall"], "bf16": bf16_peak["wall"], "fp32_cpu": fp32_peak["cpu"],
                    "bf16_cpu": bf16_peak["cpu"]}
            peaks.append(peak)
            for name, (m, dtype) in variants.items():
                if dtype == "bf16" and round_ >= args.bf16_rounds:
                    continue  # emulated bf16 is slow on CPUs without bf16 units: fewer rounds
                cpu_start = time.process_time()
                t = timed_stages(m, lambda m=m: m(batch), torch.device("cpu"))
                t["cpu_seconds"] = time.process_time() - cpu_start
                t["gflops_per_s"] = total_flops / t["total"] / 1e9
                t["gflops_per_cpu_s"] = total_flops / t["cpu_seconds"] / 1e9
                t["fraction_of_peak"] = t["gflops_per_s"] / peak[dtype]
                t["fraction_of_fp32_peak"] = t["gflops_per_s"] / peak["fp32"]
                t["cpu_fraction_of_peak"] = t["gflops_per_cpu_s"] / peak[f"{dtype}_cpu"]
                t["cpu_fraction_of_fp32_peak"] = t["gflops_per_cpu_s"] / peak["fp32_cpu"]
                samples[name].append(t)
            print(f"round {round_ + 1}/{args.repeats}: peak fp32 {peak['fp32']:.1f} bf16 {peak['bf16']:.1f} GFLOP/s; "
                  + ", ".join(f"{n} {s[-1]['total']:.2f} s" for n, s in samples.items() if s), file=sys.stderr, flush=True)
    results = {}
    for name, runs in samples.items():
        results[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        results[name]["min_total"] = min(r["total"] for r in runs)
    base = results["fp32"]["total"]
    for name in results:
        results[name]["speedup_vs_fp32"] = base / results[name]["total"]
    stage_gflop = {s: flops.total(s) / 1e9 for s in STAGES}
    out = {"size": list(args.size), "preset": args.preset, "gflop": total_flops / 1e9, "stage_gflop": stage_gflop,
           "peaks": peaks, "median_peak": {k: statistics.median(p[k] for p in peaks) for k in peaks[0]},
           "variants": results}
    if args.profile:
        best = min(("fp32+fold", "fp32+fold+nhwc"), key=lambda n: results[n]["total"])
        out["profile"] = {"variant": best, "table": profile(variants[best][0], batch)}
    return out


def profile(model: torch.nn.Module, batch: Any, top: int = 15) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad(), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        model(batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)


def demo_accuracy(run_dir: Path, max_images: int | None) -> dict[str, Any]:
    """Held-out AP of the demo model, fp32 vs fp32+fold vs bf16, on the run's validation images."""
    from focus_detr.engine.data import build_eval_dataset
    from focus_detr.engine.evaluate import evaluate

    weights = run_dir / "model_final.pth"
    if not weights.is_file():
        candidates = sorted((run_dir / "checkpoints").glob("*.pt*")) if (run_dir / "checkpoints").is_dir() else []
        if not candidates:
            raise SystemExit(f"{run_dir}: no model_final.pth and no checkpoints/ yet (is the demo still training?)")
        weights = candidates[-1]
    model = focus_detr.load(str(weights))
    cfg = model.cfg
    dataset = build_eval_dataset(run_dir / "data", "val", cfg.test_short_side, cfg.test_max_size, cfg.class_names,
                                 cfg.num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = {"fp32": model, "fp32+fold": optimize_for_inference(model, "fp32"),
                    "bf16": optimize_for_inference(model, "bf16")}
    out: dict[str, Any] = {"weights": str(weights), "images": len(dataset) if max_images is None else
                           min(len(dataset), max_images)}
    for name, m in variants.items():
        metrics = evaluate(m, dataset, torch.device("cpu"), max_images=max_images)
        assert metrics is not None
        out[name] = {k: metrics[k] for k in ("AP", "AP50", "AP75", "seconds") if k in metrics}
        print(f"{name}: AP {out[name]['AP']:.4f} AP50 {out[name].get('AP50', float('nan')):.4f} "
              f"({out[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    out["bf16_minus_fp32_AP"] = out["bf16"]["AP"] - out["fp32"]["AP"]
    out["fold_minus_fp32_AP"] = out["fp32+fold"]["AP"] - out["fp32"]["AP"]
    return out


def format_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"CPU: {m['cpu']} ({m.get('capability')}, bf16 matrix units: {m.get('bf16_units')}); torch "
             f"{m['torch']}; {report['threads']} thread(s); load average {m.get('load_average')}; {m['date']}"]
    if "speed" in report:
        s = report["speed"]
        p = s["median_peak"]
        lines += ["", f"Model {s['preset']} (random weights, focus mode) at {s['size'][0]}x{s['size'][1]}: "
                  f"{s['gflop']:.1f} GFLOP per image. Matmul peak (median of rounds; wall / per CPU second): fp32 "
                  f"{p['fp32']:.1f} / {p['fp32_cpu']:.1f}, bf16 {p['bf16']:.1f} / {p['bf16_cpu']:.1f} GFLOP/s.", "",
                  "| variant | s / image (median) | speed-up vs fp32 | GFLOP/s | of own-dtype peak | of fp32 peak | "
                  "CPU s / image | of own-dtype peak (CPU time) | of fp32 peak (CPU time) | backbone s | encoder s | "
                  "decoder s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in s["variants"].items():
            lines.append(f"| {name} | {r['total']:.2f} | {r['speedup_vs_fp32']:.2f} | {r['gflops_per_s']:.1f} | "
                         f"{r['fraction_of_peak']:.2f} | {r['fraction_of_fp32_peak']:.2f} | {r['cpu_seconds']:.2f} | "
                         f"{r['cpu_fraction_of_peak']:.2f} | {r['cpu_fraction_of_fp32_peak']:.2f} | "
                         f"{r.get('backbone', 0):.2f} | {r.get('encoder', 0):.2f} | {r.get('decoder', 0):.2f} |")
        stage = s["stage_gflop"]
        lines += ["", "GFLOP per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stage.items())]
        if "profile" in s:
            lines += ["", f"Profile of {s['profile']['variant']} (self CPU time, top ops):", "```",
                      s["profile"]["table"].rstrip(), "```"]
    if "accuracy" in report:
        a = report["accuracy"]
        lines += ["", f"Demo-trained model ({a['weights']}), {a['images']} held-out images:", "",
                  "| variant | AP | AP50 | AP75 |", "|---|---:|---:|---:|"]
        for name in ("fp32", "fp32+fold", "bf16"):
            r = a[name]
            lines.append(f"| {name} | {r['AP']:.4f} | {r.get('AP50', float('nan')):.4f} | "
                         f"{r.get('AP75', float('nan')):.4f} |")
        lines.append(f"\nAP(bf16) - AP(fp32) = {a['bf16_minus_fp32_AP']:+.4f}; "
                     f"AP(fold) - AP(fp32) = {a['fold_minus_fp32_AP']:+.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="r50_4scale")
    p.add_argument("--size", type=parse_size, default=(480, 640), help="HxW (default 480x640)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="rounds of (peaks, every variant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16-rounds", type=int, default=1, help="rounds that also time bf16 (default 1)")
    p.add_argument("--bf16-peak-n", type=int, default=512, help="matrix size of the bf16 peak (default 512)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of the fastest fp32 variant")
    p.add_argument("--no-speed", action="store_true", help="skip the speed part")
    p.add_argument("--no-bf16-speed", action="store_true", help="time the fp32 variants only")
    p.add_argument("--demo", type=Path, default=None, help="demo run folder: held-out AP fp32 vs bf16")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N held-out images")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    reuse_freed_memory()  # as the focus-detr command does (FOCUS_DETR_ALLOCATOR=system: glibc defaults)
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"))
    info["capability"] = torch.backends.cpu.get_cpu_capability()
    info["bf16_units"] = cpu_has_bf16_units()
    report: dict[str, Any] = {"machine": info, "threads": args.threads, "command": " ".join(sys.argv)}
    if not args.no_speed:
        report["speed"] = speed(args)
    if args.demo is not None:
        report["accuracy"] = demo_accuracy(args.demo, args.max_images)
    report["machine"]["load_average_end"] = list(__import__("os").getloadavg())
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(format_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
