#!/usr/bin/env python
"""Focus-DETR (focus mode) against transformers' Deformable DETR (two-stage, 4-scale, ResNet-50, random
weights, nothing downloaded), timed in the same interleaved rounds on the same input.

    python benchmarks/bench_hf_anchor.py --size 800x1333 --repeats 5 --threads 2 [--backbone-once]

Exits 0 with a message when transformers is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    import focus_detr  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from focus_detr.bench import parse_size, run_benchmark  # noqa: E402
from focus_detr.bench.anchor import anchor_unavailable_reason  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="r50_4scale", help="a ResNet-50 preset")
    p.add_argument("--size", default="800x1333")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default="focus", help="our encoder modes to time alongside (default: focus)")
    p.add_argument("--backbone-once", action="store_true", help="see `focus-detr benchmark --help`")
    p.add_argument("--json", metavar="PATH", help="write the report here")
    args = p.parse_args(argv)
    reason = anchor_unavailable_reason()
    if reason:
        print(f"skipped: {reason}")
        return 0
    report = run_benchmark(args.preset, [parse_size(args.size)], args.modes.split(","), repeats=args.repeats,
                           warmup=args.warmup, threads=args.threads, memory=False, anchor=True,
                           backbone_once=args.backbone_once, progress=lambda m: print(f"[anchor] {m}", file=sys.stderr))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    entry = report["results"][0]
    anchor = entry.get("anchor")
    if anchor is None:
        print(f"skipped: {report['anchor'].get('skipped')}")
        return 0
    info = report["anchor"]
    print(f"anchor: {info['class']} (transformers {info['transformers_version']}), backbone {info['backbone_class']} "
          f"depths {info['backbone_depths']} ({info['backbone_params'] / 1e6:.1f} M params, "
          f"{info['backbone_conv_layers']} convs), {info['params'] / 1e6:.1f} M params, "
          f"{info['num_proposals']} proposals, FFN {info['encoder_ffn_dim']}, weights: {info['weights']}")
    rows = [("stage", "anchor ms", *(f"{m} ms" for m in report["modes"]))]
    for stage in ("backbone", "encoder", "decoder", "total"):
        ours = [entry["modes"][m]["stages"][stage]["ms"] for m in report["modes"]]
        rows.append((stage, f"{anchor['stages_ms'].get(stage, 0.0):.1f}", *(f"{v:.1f}" for v in ours)))
    for r in rows:
        print("  ".join(c.rjust(12) if i else c.ljust(10) for i, c in enumerate(r)))
    print(f"GFLOPs: anchor {anchor['total']['gflops']:.1f}, "
          + ", ".join(f"{m} {entry['modes'][m]['stages']['total']['gflops']:.1f}" for m in report["modes"]))
    for m in report["modes"]:
        print(f"latency {m} / anchor: {anchor[f'{m}/anchor_ms']:.3f}")
    print("(our backbone stage includes the neck; the anchor's backbone is the ResNet only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
