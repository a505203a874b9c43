#!/usr/bin/env python
"""Run every benchmark behind benchmarks/RESULTS.md, one after another, and write a Markdown summary.

    python benchmarks/run_all.py                 # the RESULTS.md runs (about 1.5 hours on 2 busy cores)
    python benchmarks/run_all.py --quick         # smoke run: tiny preset, small sizes, 1 round
    python benchmarks/run_all.py --out-dir DIR --threads 2

JSON reports and ``summary.md`` go to ``--out-dir``; latency plots to ``benchmarks/`` (``--quick``: out-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def runs(out: str, threads: int, quick: bool) -> list[tuple[str, list[str]]]:
    t = ["--threads", str(threads)]
    cli = [sys.executable, "-m", "focus_detr.cli.main", "benchmark"]
    plots = out if quick else HERE
    if quick:
        return [
            ("model", cli + ["--preset", "tiny", "--size", "128x160", "--repeats", "1", *t,
                             "--output", f"{out}/model.json", "--plot", f"{plots}/latency_quick.png"]),
            ("train_step", [sys.executable, f"{HERE}/bench_train_step.py", "--size", "128x160", "--steps", "2",
                            "--warmup", "1", *t, "--json", f"{out}/train_step.json"]),
        ]
    return [
        # the detector as it would be with its backbone computed once per forward (see RESULTS.md)
        ("r50_backbone_once", cli + ["--size", "800x1333,480x640", "--repeats", "5", *t, "--backbone-once",
                                     "--output", f"{out}/r50_backbone_once.json",
                                     "--plot", f"{plots}/latency_r50_backbone_once.png"]),
        # the same on one thread: on a shared, oversubscribed CPU a 2-thread op waits for its descheduled
        # second thread, which inflates many-small-op stages; one thread avoids that barrier
        ("r50_backbone_once_1thread", cli + ["--size", "800x1333", "--repeats", "7", "--threads", "1",
                                             "--backbone-once", "--no-memory",
                                             "--output", f"{out}/r50_backbone_once_1thread.json",
                                             "--plot", f"{plots}/latency_r50_backbone_once_1thread.png"]),
        # without the workaround: on code before d1d0fee (e.g. 6bf73d8) these measure the backbone run 3x per
        # forward ("before the fix" in RESULTS.md); on later code they repeat the backbone-once runs
        ("r50_as_shipped", cli + ["--size", "800x1333", "--repeats", "3", *t, "--no-anchor",
                                  "--output", f"{out}/r50_as_shipped.json",
                                  "--plot", f"{plots}/latency_r50_as_shipped.png"]),
        ("r50_as_shipped_1thread", cli + ["--size", "800x1333", "--repeats", "3", "--threads", "1", "--no-anchor",
                                          "--no-memory", "--output", f"{out}/r50_as_shipped_1thread.json"]),
        ("anchor_as_shipped_1thread", [sys.executable, f"{HERE}/bench_hf_anchor.py", "--size", "800x1333",
                                       "--repeats", "3", "--threads", "1",
                                       "--json", f"{out}/anchor_as_shipped_1thread.json"]),
        ("train_step", [sys.executable, f"{HERE}/bench_train_step.py", *t, "--json", f"{out}/train_step.json"]),
        # issue 14: efficiency against the matmul peak, contention, training cost with memory, the speed knob
        ("efficiency_1thread", cli + ["--size", "800x1333", "--repeats", "1", "--warmup", "0", "--threads", "1",
                                      "--modes", "focus,dense", "--no-memory", "--no-anchor",
                                      "--output", f"{out}/efficiency_1thread.json"]),
        ("contention", cli + ["--size", "480x640", "--repeats", "2", "--threads", "2", "--modes", "focus,dense",
                              "--no-memory", "--no-anchor", "--no-peak", "--background-load", "1",
                              "--contention-threads", "1,2", "--output", f"{out}/contention.json"]),
        ("train_step_memory", [sys.executable, f"{HERE}/bench_train_step.py", "--threads", "1", "--steps", "5",
                               "--memory", "--json", f"{out}/train_step_memory.json"]),
        ("keep_ratio", [sys.executable, f"{HERE}/bench_keep_ratio.py", "--weights", "runs/demo/model_final.pth",
                        "--data", "runs/demo/data", "--json", f"{out}/keep_ratio.json",
                        "--plot", os.path.join(HERE, "..", "docs", "images", "keep_ratio_ap_vs_latency.png")]),
        ("train_step_backbone_once", [sys.executable, f"{HERE}/bench_train_step.py", *t, "--backbone-once",
                                      "--json", f"{out}/train_step_backbone_once.json"]),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=os.path.join(tempfile.gettempdir(), "focus-detr-bench"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quick", action="store_true", help="smoke run with the tiny preset")
    p.add_argument("--only", default=None, help="comma-separated run names to do (default: all)")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(HERE, "..", "src") + os.pathsep + env.get("PYTHONPATH", "")
    selected = set(args.only.split(",")) if args.only else None
    failed = []
    for name, cmd in runs(args.out_dir, args.threads, args.quick):
        if selected and name not in selected:
            continue
        print(f"==> {name}: {' '.join(cmd)}", flush=True)
        with open(os.path.join(args.out_dir, f"{name}.txt"), "w") as log:
            code = subprocess.run(cmd, stdout=log, env=env).returncode
        if code:
            failed.append(name)
            print(f"    failed with exit code {code}", flush=True)

    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from focus_detr.bench import format_report, format_train_step, refresh_derived

    parts = []
    for name in sorted(os.listdir(args.out_dir)):
        path = os.path.join(args.out_dir, name)
        if not name.endswith(".json"):
            continue
        with open(path) as f:
            data = json.load(f)
        parts.append(f"## {name[:-5]}\n")
        if "results" in data:
            parts.append(format_report(refresh_derived(data), markdown=True))
        elif "modes" in data:
            parts.append("\n".join(format_train_step(data, markdown=True)) + "\n")
        elif "points" in data:
            from focus_detr.bench.knob_sweep import format_sweep

            parts.append("\n".join(format_sweep(data, markdown=True)) + "\n")
    with open(os.path.join(args.out_dir, "summary.md"), "w") as f:
        f.write("\n".join(parts))
    print(f"summary: {os.path.join(args.out_dir, 'summary.md')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
